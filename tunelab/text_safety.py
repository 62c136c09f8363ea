"""Showing text that came from data, configs or models without letting it act.

A dataset row can hold terminal escape sequences (``\\x1b]...`` retitles a window, ``\\x1b[2J``
clears the screen, ``\\r`` overwrites a line) and markup (``<script>``). ``visible`` makes
control characters readable before text reaches a terminal; ``markdown_text`` and
``markdown_cell`` escape text placed in a Markdown report, whose viewers often pass HTML
through.
"""

from __future__ import annotations

import html
import re

# C0 and C1 controls and DEL (tab and newline are layout, kept by visible), plus the
# bidirectional overrides that make a line read differently from what it holds
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_WITH_LAYOUT = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# what cleaning drops: whole ANSI escape sequences (CSI such as colours, OSC such as window
# titles and links), then any other C0/C1 control or DEL, keeping tab, newline and CRLF
_DROPPED = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[@-Z\\-_]"
    r"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)"
)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object, keep_layout: bool = True) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\u202e``).

    ``keep_layout`` keeps newline and tab as they are (multi-line output); without it they are
    shown as ``\\x0a``/``\\x09`` too (one-line cells). A carriage return is always shown.
    """
    pattern = _CONTROL if keep_layout else _CONTROL_WITH_LAYOUT
    text = str(text)
    return pattern.sub(_escape, text) if pattern.search(text) else text


def drop_controls(text: str) -> tuple[str, int]:
    """``text`` without escape sequences and C0/C1 control characters (tab, newline and CRLF
    kept), and how many characters went."""
    cleaned = _DROPPED.sub("", text)
    return cleaned, len(text) - len(cleaned)


def markdown_text(text: object) -> str:
    """Text safe to place in Markdown prose: HTML special characters escaped (so ``<script>``
    shows as text), Markdown markup characters backslash-escaped, controls made visible."""
    escaped = html.escape(visible(text), quote=False)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", escaped)


def markdown_cell(text: object) -> str:
    """``markdown_text`` on one line, for a table cell (line breaks become spaces)."""
    return markdown_text(" ".join(str(text).split()))
