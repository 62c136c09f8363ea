"""Find and redact personal data and secrets: e-mail addresses, phone numbers, IP addresses,
credit-card numbers (Luhn-checked) and API keys or tokens.

A fine-tuned model can repeat its training text word for word, so anything private in the data
may come back out of the model. Detection is pattern-based: it catches the common shapes and
is tuned to keep false alarms on technical text (version numbers, dates, hashes in prose) low;
it is a safety net, not a guarantee.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

PLACEHOLDERS = {
    "api_key": "[API_KEY]",
    "bearer_token": "[TOKEN]",
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "credit_card": "[CREDIT_CARD]",
    "ip_address": "[IP_ADDRESS]",
    "phone": "[PHONE]",
}

_API_KEY = re.compile(
    r"\b(?:"
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{40,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r")"
)
_BEARER = re.compile(r"\bBearer\s+[A-Za-z0-9._~+/-]{16,}=*", re.IGNORECASE)
_HEX_SECRET = re.compile(r"\b[0-9a-fA-F]{32,}\b")
_BASE64_SECRET = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/=])")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_IPV4 = re.compile(
    r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# a phone number has separators between digit groups, or starts with '+'
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|\d{3}[ .-]\d{3}[ .-]\d{4}"
    r")(?![\w.-]?\d)"
)
# addresses that name no one: loopback, unspecified, broadcast
_HARMLESS_IPS = {"127.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "::"}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _is_card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group())
    # binary tables (0011 0100 ...) pass Luhn by chance; card numbers use more digits
    return 13 <= len(digits) <= 19 and not set(digits) <= {"0", "1"} and luhn_valid(digits)


def _is_ipv6(match: re.Match[str]) -> bool:
    text = match.group()
    if text in _HARMLESS_IPS or ("::" not in text and text.count(":") != 7):
        return False  # 12:30:45 is a time, not an address
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_ipv4(match: re.Match[str]) -> bool:
    return match.group() not in _HARMLESS_IPS


def _is_phone(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 7 <= len(digits) <= 15


def _is_base64_secret(match: re.Match[str]) -> bool:
    # a secret mixes upper case, lower case and digits; a long word or path does not
    text = match.group()
    return (
        any(c.isdigit() for c in text)
        and any(c.isupper() for c in text)
        and any(c.islower() for c in text)
        and text.count("/") < 2
    )


def _is_hex_secret(match: re.Match[str]) -> bool:
    text = match.group()  # a long run of decimal digits is a number, not a key
    return any(c in "abcdefABCDEF" for c in text) and any(c.isdigit() for c in text)


def _always(match: re.Match[str]) -> bool:
    return True


# (type, pattern, check) in the order they run: secrets before the number patterns that would
# match their digits
_DETECTORS: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], bool]]] = [
    ("api_key", _API_KEY, _always),
    ("bearer_token", _BEARER, _always),
    ("secret", _HEX_SECRET, _is_hex_secret),
    ("secret", _BASE64_SECRET, _is_base64_secret),
    ("email", _EMAIL, _always),
    ("credit_card", _CARD, _is_card),
    ("ip_address", _IPV6, _is_ipv6),
    ("ip_address", _IPV4, _is_ipv4),
    ("phone", _PHONE, _is_phone),
]


_KEY_PREFIXES = (
    "AKIA",
    "ASIA",
    "sk-",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xox",
    "AIza",
    "hf_",
)


def _may_contain(kind: str, pattern: re.Pattern[str], text: str, numbers: bool) -> bool:
    """A cheap substring test that skips a regex pass which cannot match (most texts)."""
    if kind == "api_key":
        return any(prefix in text for prefix in _KEY_PREFIXES)
    if kind == "bearer_token":
        return "earer" in text or "EARER" in text
    if kind == "email":
        return "@" in text
    if pattern is _IPV6:
        return "::" in text or text.count(":") >= 7
    return numbers


# every remaining detector needs a run of 7+ digits (with separators), a dotted quad, or a
# 32-character token: one scan rules out most texts before four detector passes
_NUMBER_OR_SECRET = re.compile(r"\d[\d ().+-]{5,}\d|\d\.\d{1,3}\.\d|[A-Za-z0-9+/_=-]{32}")


def redact(text: str) -> tuple[str, Counter[str]]:
    """``text`` with every detected item replaced by its placeholder, and counts per type."""
    counts: Counter[str] = Counter()
    numbers = _NUMBER_OR_SECRET.search(text) is not None
    for kind, pattern, check in _DETECTORS:
        if not _may_contain(kind, pattern, text, numbers):
            continue

        def replace(match: re.Match[str], kind: str = kind, check=check) -> str:
            if not check(match):
                return match.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts


def snippet(redacted: str, placeholder: str, width: int = 60) -> str:
    """The redacted text around the first ``placeholder``, to show in a report."""
    at = redacted.find(placeholder)
    if at < 0:
        return redacted[:width]
    start = max(0, at - width // 2)
    end = min(len(redacted), at + len(placeholder) + width // 2)
    prefix = "..." if start else ""
    suffix = "..." if end < len(redacted) else ""
    return prefix + redacted[start:end].replace("\n", " ") + suffix
