"""Map raw rows of any common schema onto one canonical ``Example``.

Schemas (TRL's conventions plus the usual others):
- plain text: ``{"text"}``
- prompt/completion: ``{"prompt", "completion"}`` (strings, or lists of chat messages)
- instruction: ``{"instruction", "input"?, "output"}`` (Alpaca)
- chat: ``{"messages": [{"role", "content"}]}``; ShareGPT ``{"conversations": [{"from", "value"}]}``
  (an assistant message may carry OpenAI-style ``tool_calls`` (content ``""`` or null), a ``tool``
  message answers one, and the row's ``tools`` column lists the functions, as in TRL)
- a user template that builds prompt and completion from any columns.
"""

from __future__ import annotations

import json
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
    messages: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # function schemas the chat template is given

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
            return [text for m in self.messages for text in message_texts(m)]
        if self.completion is not None:
            return [self.prompt or "", self.completion]
        return [self.text or ""]

    def map_texts(self, fn: Any) -> Example:
        """A copy with ``fn`` applied to every string."""
        if self.messages is not None:
            messages = [{**m, "content": fn(m["content"])} for m in self.messages]
            return Example(self.origin, messages=messages, meta=dict(self.meta), tools=self.tools)
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
            return {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}
        if self.completion is not None:
            return {"prompt": self.prompt, "completion": self.completion}
        return {"text": self.text}


def message_texts(message: dict[str, Any]) -> list[str]:
    """The strings of one chat message: its content, then each tool call as name(arguments)."""
    calls = [
        f"{c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})"
        for c in message.get("tool_calls") or []
    ]
    return [message["content"], *calls]


def is_empty_answer(message: dict[str, Any]) -> bool:
    """An assistant turn with neither text nor a tool call: nothing to learn from it."""
    return (
        message["role"] == "assistant"
        and not message["content"].strip()
        and not message.get("tool_calls")
    )


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
) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise TunelabError(
            f"{origin}: '{key}' should be a non-empty list of {{'{role_key}': ..., "
            f"'{content_key}': ...}} objects, found {type(raw).__name__}."
        )
    messages = []
    for i, message in enumerate(raw):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        has_content = isinstance(message, dict) and (content_key in message or calls)
        if not isinstance(message, dict) or role_key not in message or not has_content:
            raise TunelabError(
                f"{origin}: {key}[{i}] should have '{role_key}' and '{content_key}', found "
                f"{message!r:.80}. Each message needs both."
            )
        role, content = message[role_key], message.get(content_key)
        allowed = role_map or {r: r for r in ROLES}
        if role not in allowed:
            raise TunelabError(
                f"{origin}: {key}[{i}] has role {role!r}; expected one of "
                f"{', '.join(map(repr, allowed))}.{did_you_mean(str(role), allowed)}"
            )
        role = allowed[role]
        if calls is not None and role != "assistant":
            raise TunelabError(
                f"{origin}: {key}[{i}] is a {role} message with tool_calls; only an assistant "
                "message calls tools. Move the calls to an assistant message."
            )
        if content is None and calls:  # OpenAI's convention for a turn that only calls a tool
            content = ""
        if not isinstance(content, str):
            raise TunelabError(
                f"{origin}: {key}[{i}].{content_key} should be a string, found "
                f"{type(content).__name__}"
                + (" (null is allowed only with tool_calls)." if content is None else ".")
            )
        out: dict[str, Any] = {"role": role, "content": content}
        if calls is not None:
            out["tool_calls"] = _tool_calls(calls, f"{origin}: {key}[{i}].tool_calls")
        for extra in ("tool_call_id", "name"):  # which call a tool message answers
            if role == "tool" and isinstance(message.get(extra), str):
                out[extra] = message[extra]
        messages.append(out)
    if not any(m["role"] == "assistant" for m in messages):
        raise TunelabError(
            f"{origin}: '{key}' has no assistant message, so there is nothing to learn. Add the "
            "answer as an assistant turn."
        )
    return messages


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls in the form chat templates read: ``{"type": "function",
    "function": {"name": str, "arguments": dict}}`` (a JSON string of arguments is parsed,
    as transformers' templates expect a mapping)."""
    example = '[{"type": "function", "function": {"name": "get_weather", "arguments": {...}}}]'
    if not isinstance(raw, list) or not raw:
        raise TunelabError(f"{where} should be a non-empty list of calls like {example}.")
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name:
            raise TunelabError(
                f"{where}[{j}] should be {{'type': 'function', 'function': {{'name': ..., "
                f"'arguments': ...}}}}, found {call!r:.80}."
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise TunelabError(
                    f"{where}[{j}].function.arguments is not valid JSON ({exc.msg}): "
                    f"{arguments!r:.80}. Write the arguments as a JSON object."
                ) from None
        if not isinstance(arguments, dict):
            raise TunelabError(
                f"{where}[{j}].function.arguments should be a JSON object, found "
                f"{type(arguments).__name__}."
            )
        normal = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normal["id"] = call["id"]
        calls.append(normal)
    return calls


def _tools(row: dict[str, Any], origin: str) -> list[dict[str, Any]] | None:
    """The row's ``tools`` column (a list of function schemas, or that list as a JSON string)."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise TunelabError(
                f"{origin}: 'tools' is a string that is not valid JSON ({exc.msg}). Give a list "
                "of function schemas."
            ) from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TunelabError(
            f"{origin}: 'tools' should be a list of function schemas ({{'type': 'function', "
            f"'function': {{'name': ..., 'parameters': ...}}}}), found {type(tools).__name__}."
        )
    return tools


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
        label = row.get("label")
        if label is False or isinstance(label, str) and label.strip().lower() == "false":
            # KTO's unpaired rows: the completion is one the model should not give (a CSV or
            # TSV file writes its false as text)
            raise TunelabError(
                f"{origin}: the row has 'label': false (KTO's prompt/completion/label format): "
                "its completion is marked bad, and SFT would teach it. Train this file with "
                "objective: kto, or remove the rows labelled false."
            )
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = _messages(
                prompt + completion, origin, "prompt+completion", "role", "content"
            )
            return Example(origin, messages=messages, tools=_tools(row, origin))
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
            origin,
            messages=_messages(row.get("messages"), origin, "messages", "role", "content"),
            tools=_tools(row, origin),
        )
    if schema == "sharegpt":
        return Example(
            origin,
            messages=_messages(
                row.get("conversations"), origin, "conversations", "from", "value", _SHAREGPT_ROLES
            ),
            tools=_tools(row, origin),
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
