"""The one exception type for problems a user can fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TunelabError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    The CLI prints it without a traceback (unless ``--debug``); library callers can
    catch it to tell their own mistakes from tunelab's.
    """


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest spelling of ``word`` among ``choices``, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean 'x'?' suffix for an error message, or '' when nothing is close."""
    match = closest(word, choices)
    return f" Did you mean '{match}'?" if match else ""
