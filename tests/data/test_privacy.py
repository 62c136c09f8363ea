"""PII detection and redaction, per type, with the false alarms it must avoid."""

from __future__ import annotations

import pytest

from tunelab.data.privacy import luhn_valid, redact, snippet


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("write to jane.doe@example.com today", "email", "write to [EMAIL] today"),
        ("call +44 20 7946 0958 now", "phone", "call [PHONE] now"),
        ("call (555) 123-4567", "phone", "call [PHONE]"),
        ("host 192.168.1.20 down", "ip_address", "host [IP_ADDRESS] down"),
        ("host 2001:db8::8a2e:370:7334 down", "ip_address", "host [IP_ADDRESS] down"),
        ("card 4111 1111 1111 1111 ok", "credit_card", "card [CREDIT_CARD] ok"),
        ("AKIAIOSFODNN7EXAMPLE", "api_key", "[API_KEY]"),
        ("key sk-abcdefghijklmnopqrstuvwx12", "api_key", "key [API_KEY]"),
        ("ghp_" + "a1B2" * 9, "api_key", "[API_KEY]"),
        ("Authorization: Bearer abcdef1234567890abcdef", "bearer_token", "Authorization: [TOKEN]"),
        ("secret d41d8cd98f00b204e9800998ecf8427e", "secret", "secret [SECRET]"),
    ],
)
def test_each_type(text, kind, expected):
    redacted, counts = redact(text)
    assert redacted == expected and counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "released 1998-06-30 at 12:30:45",
        "card-like 1234 5678 9012 3456 fails Luhn",
        "loopback 127.0.0.1",
        "a number 31415926535897932384",
        "bits 0011 0100 0011 0100 0011 0100",
    ],
)
def test_no_false_alarm(text):
    assert redact(text) == (text, {})


def test_luhn_and_snippet():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    redacted, counts = redact("a " * 50 + "mail x@y.org please " + "b " * 50)
    assert counts == {"email": 1}
    shown = snippet(redacted, "[EMAIL]")
    assert "[EMAIL]" in shown and shown.startswith("...") and "x@y.org" not in shown
