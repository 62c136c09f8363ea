"""Map raw rows of any common schema onto one canonical ``Example``.

Schemas (TRL's conventions plus the usual others):
- plain text: ``{"text"}``
- prompt/completion: ``{"prompt", "completion"}`` (strings, or lists of chat messages)
- instruction: ``{"instruction", "input"?, "output"}`` (Alpaca)
- chat: ``{"messages": [{"role", "content"}]}``; ShareGPT ``{"conversations": [{"from", "value"}]}``
- a user template that builds prompt and completion from any columns.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import TunelabError, closest, did_you_mean

SCHEMAS = ("auto", "text", "prompt_completion", "instruction", "messages", "sharegpt", "template")
_KNOWN_COLUMNS = (
    "text",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
)
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "tool": "tool",
}


@dataclass
class Example:
    """One training example in canonical form; exactly one of text / prompt+completion / messages.

    ``origin`` says where it came from ("data.jsonl:12") so any later error can point back.
    """

    origin: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.messages is not None:
            return "messages"
        if self.completion is not None:
            return "prompt_completion"
        return "text"

    def texts(self) -> list[str]:
        """Every string of the example, in order (what cleaning and dedup look at)."""
        if self.messages is not None:
            return [m["content"] for m in self.messages]
        if self.completion is not None:
            return [self.prompt or "", self.completion]
        return [self.text or ""]

    def map_texts(self, fn: Any) -> Example:
        """A copy with ``fn`` applied to every string."""
        if self.messages is not None:
            messages = [{**m, "content": fn(m["content"])} for m in self.messages]
            return Example(self.origin, messages=messages, meta=dict(self.meta))
        if self.completion is not None:
            return Example(
                self.origin,
                prompt=fn(self.prompt or ""),
                completion=fn(self.completion),
                meta=dict(self.meta),
            )
        return Example(self.origin, text=fn(self.text or ""), meta=dict(self.meta))

    def to_row(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"messages": self.messages}
        if self.completion is not None:
            return {"prompt": self.prompt, "completion": self.completion}
        return {"text": self.text}


def detect_schema(row: dict[str, Any]) -> str | None:
    """The schema a row's keys say it has, or None."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "text" in row:
        return "text"
    return None


def _need_str(row: dict[str, Any], key: str, origin: str, what: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in row else f"{type(value).__name__} {value!r:.60}"
        hint = did_you_mean(key, [str(k) for k in row]) if key not in row else ""
        raise TunelabError(
            f"{origin}: '{key}' should be a string ({what}), found {found}.{hint} Fix that row "
            "or remove it."
        )
    return value


def _messages(
    raw: Any,
    origin: str,
    key: str,
    role_key: str,
    content_key: str,
    role_map: dict[str, str] | None = None,
) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise TunelabError(
            f"{origin}: '{key}' should be a non-empty list of {{'{role_key}': ..., "
            f"'{content_key}': ...}} objects, found {type(raw).__name__}."
        )
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise TunelabError(
                f"{origin}: {key}[{i}] should have '{role_key}' and '{content_key}', found "
                f"{message!r:.80}. Each message needs both."
            )
        role, content = message[role_key], message[content_key]
        allowed = role_map or {r: r for r in ROLES}
        if role not in allowed:
            raise TunelabError(
                f"{origin}: {key}[{i}] has role {role!r}; expected one of "
                f"{', '.join(map(repr, allowed))}.{did_you_mean(str(role), allowed)}"
            )
        if not isinstance(content, str):
            raise TunelabError(
                f"{origin}: {key}[{i}].{content_key} should be a string, found "
                f"{type(content).__name__}."
            )
        messages.append({"role": allowed[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise TunelabError(
            f"{origin}: '{key}' has no assistant message, so there is nothing to learn. Add the "
            "answer as an assistant turn."
        )
    return messages


def template_fields(template: str) -> list[str]:
    """The column names a ``{column}`` template uses."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def to_example(
    row: dict[str, Any],
    origin: str,
    schema: str = "auto",
    prompt_template: str | None = None,
    completion_template: str | None = None,
) -> Example:
    """Turn one raw row into an ``Example``; errors name the row's origin and what to fix."""
    if not isinstance(row, dict):
        raise TunelabError(
            f"{origin}: expected an object with named fields, found {type(row).__name__}."
        )
    if prompt_template is not None and completion_template is not None:
        schema = "template"
    if schema == "auto":
        schema = detect_schema(row) or ""
        if not schema:
            keys = ", ".join(map(repr, row)) or "none"
            # a misspelt column is the usual cause: name the close match
            hints = "".join(
                f" Column {k!r} looks like a misspelt {closest(str(k), _KNOWN_COLUMNS)!r}."
                for k in row
                if k not in _KNOWN_COLUMNS and closest(str(k), _KNOWN_COLUMNS)
            )[:300]
            raise TunelabError(
                f"{origin}: cannot tell the schema from the columns ({keys}).{hints} Expected "
                "'text'; "
                "'prompt' and 'completion'; 'instruction' and 'output'; 'messages'; or "
                "'conversations'. Rename the columns, or map them with prompt_template and "
                "completion_template (e.g. 'What does {term} mean?' and '{definition}')."
            )
    if schema == "text":
        return Example(origin, text=_need_str(row, "text", origin, "the document"))
    if schema == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = _messages(
                prompt + completion, origin, "prompt+completion", "role", "content"
            )
            return Example(origin, messages=messages)
        return Example(
            origin,
            prompt=_need_str(row, "prompt", origin, "the prompt"),
            completion=_need_str(row, "completion", origin, "the answer"),
        )
    if schema == "instruction":
        instruction = _need_str(row, "instruction", origin, "the task")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise TunelabError(
                f"{origin}: 'input' should be a string, found {type(extra).__name__}."
            )
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(
            origin, prompt=prompt, completion=_need_str(row, "output", origin, "the answer")
        )
    if schema == "messages":
        return Example(
            origin, messages=_messages(row.get("messages"), origin, "messages", "role", "content")
        )
    if schema == "sharegpt":
        return Example(
            origin,
            messages=_messages(
                row.get("conversations"), origin, "conversations", "from", "value", _SHAREGPT_ROLES
            ),
        )
    if schema == "template":
        assert prompt_template is not None and completion_template is not None
        return Example(
            origin,
            prompt=_fill(prompt_template, row, origin, "prompt_template"),
            completion=_fill(completion_template, row, origin, "completion_template"),
            meta={k: v for k, v in row.items() if isinstance(v, str)},
        )
    raise TunelabError(
        f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}."
        f"{did_you_mean(schema, SCHEMAS)}"
    )


def _check_template(template: str, key: str) -> None:
    """Only plain ``{column}`` fields: a format spec (``{c:>9999999999}``) can build gigabytes
    and an attribute or index (``{c.__class__}``) reaches into Python objects."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TunelabError(
            f"config key '{key}' ({template!r}) is not a valid template: {exc}. Use {{column}} "
            "placeholders and double braces {{ }} for literal braces."
        ) from None
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if "." in name or "[" in name or spec or conversion:
            raise TunelabError(
                f"config key '{key}' ({template!r}) has the field {{{name}"
                f"{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}; only "
                "plain {column} placeholders are allowed (no formats, conversions, attributes "
                "or indexes). Write {column} and format the column in the data."
            )


def _fill(template: str, row: dict[str, Any], origin: str, key: str) -> str:
    _check_template(template, key)
    for name in template_fields(template):
        if name not in row:
            raise TunelabError(
                f"{origin}: {key} uses column '{{{name}}}', which this row lacks (it has "
                f"{', '.join(map(repr, row))}).{did_you_mean(name, row)} Fix the template or "
                "the data."
            )
        if not isinstance(row[name], str | int | float):
            raise TunelabError(
                f"{origin}: column '{name}' used by {key} should be text, found "
                f"{type(row[name]).__name__}."
            )
    try:
        return template.format(**row)
    except (KeyError, IndexError, ValueError) as exc:
        raise TunelabError(
            f"config key '{key}' ({template!r}) is not a valid template: {exc}. Use {{column}} "
            "placeholders and double braces {{ }} for literal braces."
        ) from None
