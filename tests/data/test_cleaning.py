"""Cleaning functions: unicode, whitespace, HTML, rules (the FOLDOC preset), garbage measures."""

from __future__ import annotations

import pytest

from tunelab.data import cleaning
from tunelab.errors import TunelabError

FOLDOC = (
    "<language, humour> A daft way of encoding text by {exclamation marks}, named after the "
    "{MSDOS} {batch file}.\n\n{wiki entry (http://esolangs.org/wiki/!!!Batch)}.\n\n"
    "[{Jargon File}]\n\n(2014-10-25)"
)


def test_foldoc_preset():
    rules = cleaning.parse_rules(["foldoc"])
    assert cleaning.fold_whitespace(cleaning.apply_rules(FOLDOC, rules)) == (
        "A daft way of encoding text by exclamation marks, named after the MSDOS batch file."
        "\n\nwiki entry."
    )
    senses = "#\n\n1. <character> {hash character}.\n\n2. <programming> {hash coding}."
    assert cleaning.apply_rules(senses, rules) == "#\n\n1. hash character.\n\n2. hash coding."


def test_user_rules_and_errors():
    rules = cleaning.parse_rules([r"\bcolour\b => color", r"(\d+) ms => \1 milliseconds"])
    assert cleaning.apply_rules("colour in 5 ms", rules) == "color in 5 milliseconds"
    with pytest.raises(TunelabError, match="neither a preset.*Did you mean 'foldoc'"):
        cleaning.parse_rules(["foldc"])
    with pytest.raises(TunelabError, match=r"'\(unclosed => x' is not a valid regular expression"):
        cleaning.parse_rules(["(unclosed => x"])


def test_unicode_and_whitespace():
    assert cleaning.normalize_unicode("Cafe\u0301\u200b", "NFC") == "Café"
    assert cleaning.normalize_unicode("ﬁle １", "NFKC") == "file 1"
    assert cleaning.fold_whitespace("  a \t b  \r\n\n\n\nc  ") == "a b\n\nc"
    assert cleaning.fold_whitespace("Q:   ", keep_edges=True) == "Q: "


def test_strip_html_keeps_text_and_non_html_angle_brackets():
    text = "<p>Hello <b>world</b> &amp; co<br/>x</p><script>alert(1)</script> <language> <a@b.org>"
    assert cleaning.strip_html(text) == "Hello world & co\nx\n <language> <a@b.org>"


def test_garbage_measures():
    assert cleaning.nonprintable_ratio("ab\x00\x01") == 0.5
    assert cleaning.alpha_ratio("12345 abcde") == 0.5
    assert cleaning.repeated_ngram_ratio("buy now " * 20) > 0.9
    spam = "buy now cheap pills " * 10
    assert cleaning.garbage_reason(spam, 0.05, 0.25, 0.5) == "repeated n-grams"
    assert (
        cleaning.garbage_reason("12 34 56 78 90 11 22 33 44 55 ab", 0.05, 0.25, 0.5)
        == "too few letters"
    )
    assert (
        cleaning.garbage_reason("\x00\x01\x02 hello", 0.05, 0.25, 0.5) == "non-printable characters"
    )
    assert cleaning.garbage_reason("42", 0.05, 0.25, 0.5) is None  # too short to judge
