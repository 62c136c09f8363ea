"""The request bodies the server accepts, as the OpenAI API documents them (the subset tunelab
serves), and its error JSON. Fields tunelab cannot honour are refused, not ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI fields tunelab cannot honour, each with a test of the values that ask for nothing
# (clients send some of them with their default value on every request).
_NOTHING_ASKED: dict[str, Any] = {
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: not v or (isinstance(v, dict) and v.get("type") == "text"),
    "modalities": lambda v: not v or list(v) == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
}


class _Sampling(BaseModel):
    # Clients send fields tunelab has no use for (user, metadata, ...): allow them, but refuse
    # those that ask for something tunelab would not do (``unsupported``).
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0 keeps only the top token: greedy
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] = 1

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI reads null as "not given"; clients send it (openai's temperature=None does).
        if isinstance(data, dict):
            defaults = ("temperature", "top_p", "n", "stream", "max_tokens", "seed", "stop")
            data = {k: v for k, v in data.items() if not (k in defaults and v is None)}
        return data

    def unsupported(self) -> str | None:
        """The first field that asks for something tunelab does not do (log-probabilities,
        tools, a response format, penalties, ...), or None."""
        extra = self.model_extra or {}
        for name, asks_nothing in _NOTHING_ASKED.items():
            if name in extra and not asks_nothing(extra[name]):
                return name
        return None

    def stop_strings(self) -> list[str]:
        """The stop strings, without empty ones (an empty string stops nothing)."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [stop for stop in stops if stop]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict[str, Any]]) -> Any:
        # clients send content as parts ([{"type": "text", "text": ...}]); the models are text
        for index, part in enumerate([] if isinstance(content, str) else content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"part {index} is {part.get('type')!r}; tunelab serves text models, so "
                    "only text parts ({'type': 'text', 'text': '...'}) or a string are accepted"
                )
        return content

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
