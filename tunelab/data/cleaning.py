"""Text cleaning: unicode and whitespace normalisation, regex rules, HTML stripping, and the
garbage measures that filters compare with thresholds.

Each function takes and returns one string, so a step is ``example.map_texts(fn)`` and the
data stage can count the examples it changed.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Literal

from tunelab.errors import TunelabError, did_you_mean
from tunelab.text_safety import drop_controls

# FOLDOC's markup, the worked example of rules: links, category tags, dates, source notes.
# Order matters: the source note is removed before links lose their braces.
PRESETS: dict[str, list[str]] = {
    "foldoc": [
        r"\s*\[\{Jargon File\}\]\s* => \n\n",  # the source note '[{Jargon File}]'
        r"\{([^{}]*?)\s+\([^(){}]*\)\} => \1",  # {label (url)} -> label
        r"\{([^{}]*)\} => \1",  # {link text} -> link text
        # '<category, subcategory>' tags heading a paragraph (after an optional '1.' sense)
        r"(?m)^(\d+\.\s*)?(?:<[A-Za-z][\w ,/&'-]*>\s*)+ => \1",
        r"(?m)\s*^\(\d{4}-\d{2}-\d{2}\)[ \t]*$ => ",  # '(1998-06-30)' date paragraphs
    ],
}
RULE_SEPARATOR = " => "

_HTML_ELEMENTS = (
    "a|abbr|b|blockquote|body|br|caption|center|cite|code|dd|del|div|dl|dt|em|font|h[1-6]|head|"
    "hr|html|i|img|ins|kbd|li|link|meta|ol|p|pre|q|s|small|span|strike|strong|sub|sup|table|"
    "tbody|td|tfoot|th|thead|title|tr|tt|u|ul|var"
)
_ATTRIBUTE = r"""\s+[a-zA-Z_:][\w:.-]*(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?"""
_HTML_TAG = re.compile(rf"</?(?:{_HTML_ELEMENTS})(?:{_ATTRIBUTE})*\s*/?>", re.IGNORECASE)
_HTML_BREAK = re.compile(r"<(?:br|/p|/div|/li|/tr|/h[1-6])\b[^<>]*>", re.IGNORECASE)
_HTML_DROP = re.compile(r"<(script|style)\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});")

_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_SPACE_BEFORE_NEWLINE = re.compile(r" +\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")

Rule = tuple[re.Pattern[str], str, str]  # compiled pattern, replacement, the rule as written


def parse_rules(rules: list[str]) -> list[Rule]:
    """Compile ``clean_rules``: preset names (``foldoc``) or ``'pattern => replacement'``."""
    compiled: list[Rule] = []
    for rule in rules:
        if rule in PRESETS:
            compiled.extend(parse_rules(PRESETS[rule]))
            continue
        if RULE_SEPARATOR not in rule:
            raise TunelabError(
                f"clean_rules entry {rule!r} is neither a preset ({', '.join(PRESETS)}) nor "
                f"'pattern => replacement'.{did_you_mean(rule, PRESETS)} Example: "
                r"'\{([^{}]*)\} => \1' turns {link} into link."
            )
        pattern, replacement = rule.split(RULE_SEPARATOR, 1)
        try:
            regex = re.compile(pattern)
            regex.sub(replacement, "")  # a bad group reference only shows when substituting
        except (re.error, IndexError) as exc:
            raise TunelabError(
                f"clean_rules entry {rule!r} is not a valid regular expression rule ({exc}). "
                "Use Python re syntax; refer to groups as \\1."
            ) from None
        compiled.append((regex, replacement.replace("\\n", "\n"), rule))
    return compiled


def apply_rules(text: str, rules: list[Rule]) -> str:
    for regex, replacement, _ in rules:
        text = regex.sub(replacement, text)
    return text


_NORMAL_FORMS: dict[str, Literal["NFC", "NFD", "NFKC", "NFKD"]] = {
    "NFC": "NFC",
    "NFD": "NFD",
    "NFKC": "NFKC",
    "NFKD": "NFKD",
}


def normalize_unicode(text: str, form: str = "NFC") -> str:
    """Unicode normal form (NFKC also folds look-alikes such as 'ﬁ' and full-width letters);
    zero-width and byte-order marks go, since they are invisible but split tokens. ``form``
    is one of unicodedata's four forms or 'none'."""
    if form != "none":
        text = unicodedata.normalize(_NORMAL_FORMS[form], text)
    return text.translate(_INVISIBLE)


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


def drop_control_chars(text: str) -> tuple[str, int]:
    """``text`` without C0/C1 control characters such as terminal escapes (tab, newline and a
    CR before a newline stay), and how many characters went."""
    return drop_controls(text)


def fold_whitespace(text: str, keep_edges: bool = False) -> str:
    """Runs of spaces and tabs become one space, line ends lose trailing spaces, more than one
    blank line becomes one. ``keep_edges`` keeps one leading/trailing space: a plain-rendered
    prompt ending in a space, or a completion starting with one, depends on it."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    folded = _HORIZONTAL_SPACE.sub(" ", text)
    folded = _MANY_NEWLINES.sub("\n\n", _SPACE_BEFORE_NEWLINE.sub("\n", folded))
    stripped = folded.strip()
    if keep_edges and stripped:
        if folded[0].isspace():
            stripped = folded[0] + stripped
        if folded[-1].isspace():
            stripped += folded[-1]
    return stripped


def strip_html(text: str) -> str:
    """Remove HTML markup (only real element names, so '<language>' tags and '<a@b.c>'
    addresses stay), keep the text inside, and decode entities such as '&amp;'."""
    if "<" in text:
        text = _HTML_DROP.sub("", _HTML_COMMENT.sub("", text))
        text = _HTML_BREAK.sub("\n", text)
        text = _HTML_TAG.sub("", text)
    if "&" in text and _ENTITY.search(text):
        text = html.unescape(text)
    return text


def nonprintable_ratio(text: str) -> float:
    """Share of characters that are control or unprintable (newline and tab are fine)."""
    visible = text.replace("\n", "").replace("\t", "")
    if not text or visible.isprintable():  # the usual case, decided in C
        return 0.0
    return sum(1 for c in visible if not c.isprintable()) / len(text)


def alpha_ratio(text: str) -> float:
    """Share of the non-space characters that are letters."""
    visible = len(text) - sum(map(str.isspace, text))
    if not visible:
        return 0.0
    return sum(map(str.isalpha, text)) / visible


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (spam and loops score high)."""
    return _repeated_share(_WORD.findall(text.lower()), n)


def _repeated_share(words: list[str], n: int = 3) -> float:
    total = len(words) - n + 1
    if total <= 1:
        return 0.0
    return 1 - len(set(zip(*(words[i:] for i in range(n)), strict=False))) / total


# garbage measures only judge texts long enough for a ratio to mean something
GARBAGE_MIN_CHARS = 20
GARBAGE_MIN_WORDS = 20


def garbage_reason(
    text: str,
    max_nonprintable_ratio: float | None,
    min_alpha_ratio: float | None,
    max_repeated_ngram_ratio: float | None,
) -> str | None:
    """The name of the first garbage filter ``text`` fails, or None when it passes."""
    if max_nonprintable_ratio is not None and nonprintable_ratio(text) > max_nonprintable_ratio:
        return "non-printable characters"
    if (
        min_alpha_ratio is not None
        and len(text) >= GARBAGE_MIN_CHARS
        and alpha_ratio(text) < min_alpha_ratio
    ):
        return "too few letters"
    if max_repeated_ngram_ratio is not None:
        words = _WORD.findall(text.lower())
        if len(words) >= GARBAGE_MIN_WORDS and _repeated_share(words) > max_repeated_ngram_ratio:
            return "repeated n-grams"
    return None
