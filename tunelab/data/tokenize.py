"""Render canonical examples to token ids with a loss mask.

The loss covers only what the model should learn to produce: the completion of a
prompt/completion pair, every assistant turn of a chat, the whole of a plain text. The
end-of-sequence token is always inside the loss, even when the pad token is the same token,
or the tuned model never learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.schema import Example, is_empty_answer
from tunelab.errors import TunelabError
from tunelab.template_sandbox import render_chat as render_limited

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def uses_chat_template(tokenizer: Any, chat_format: str) -> bool:
    """Whether prompt/completion examples are rendered with the model's chat template."""
    if chat_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TunelabError(
                "chat_format is 'chat' but the tokenizer has no chat template. Use "
                "chat_format: plain, or a model with a chat template."
            )
        return True
    if chat_format == "plain":
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def as_messages(example: Example, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The example as a chat (prompt/completion becomes one user and one assistant turn)."""
    if example.messages is not None:
        messages = list(example.messages)
    else:
        messages = [
            {"role": "user", "content": example.prompt or ""},
            {"role": "assistant", "content": example.completion or ""},
        ]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_prompt(tokenizer: Any, prompt: str, chat: bool, system_prompt: str | None = None) -> str:
    """The text a model sees before its answer, exactly as in training.

    A plain prompt starts with the BOS text when the tokenizer puts one in front by itself
    (``bos_text``), as every plain text does in training, and loses its trailing spaces and
    tabs: in training the space at the end of "Answer: " is part of the answer's first token
    (" Oslo"), so the model learned to answer after "Answer:"; a prompt ending in a lone space
    token is a state it never saw. Tokenize the result with ``add_special_tokens=False``.
    """
    if not chat:
        return with_bos(bos_text(tokenizer), prompt.rstrip(" \t"))
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    allow_empty: bool = False,
) -> str:
    """The chat as the model's template writes it (with the function schemas when given),
    rendered under tunelab's template limits (``template_sandbox``); ``allow_empty`` for a
    prefix of a conversation, which may render to nothing."""
    extra = {"tools": tools} if tools else {}
    return render_limited(
        tokenizer,
        messages,
        allow_empty=allow_empty,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )


def chat_spans(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    origin: str = "example",
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant answer (with its end tag).

    A span runs from the end of the rendering of the turns before it (with the generation
    prompt) to the end of the rendering that includes it, so the template's own end-of-turn
    token is inside the span; the template decides the layout, not tunelab. An empty assistant
    turn (no text, no tool call) gets no span: an empty reply is not an answer to learn. A turn
    with tool calls must show each call's name, or the template dropped them.
    """
    full = render_chat(tokenizer, messages, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or is_empty_answer(message):
            continue
        before = (
            render_chat(
                tokenizer, messages[:i], tools, add_generation_prompt=True, allow_empty=True
            )
            if i
            else ""
        )
        upto = render_chat(tokenizer, messages[: i + 1], tools)
        if not full.startswith(upto) or not upto.startswith(before):
            raise TunelabError(
                "the tokenizer's chat template renders a conversation differently from its "
                "prefixes, so the answer tokens cannot be located. Use chat_format: plain or a "
                "template whose turns append."
            )
        for call in message.get("tool_calls") or []:
            if call["function"]["name"] not in upto[len(before) :]:
                raise TunelabError(
                    f"{origin}: assistant message {i} has tool_calls, which the model's chat "
                    "template does not render (the call to "
                    f"{call['function']['name']!r} would vanish from the training text). Remove "
                    "the tool calls from the data, or use a model whose chat template supports "
                    "tools."
                )
        spans.append((len(before), len(upto)))
    return full, spans


def _tokenize_with_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], max_length: int
) -> TokenizedExample:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        # a token holding any character of an answer is trained: a prompt ending in a space
        # ("Answer: ") merges that space with the answer's first word (" Oslo"), and a token
        # counted from where it starts would leave the first word out of the loss
        inside = any(start < e and end > s or (start == end and s < end <= e) for s, e in spans)
        labels.append(token if inside else IGNORE_INDEX)
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated)


def render_example(
    example: Example,
    tokenizer: Any,
    chat: bool,
    system_prompt: str | None = None,
    answer_spans: bool = True,
    bos: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The whole text training tokenizes for ``example`` and the character spans of the loss.

    The one rendering path: training (``tokenize_example``) and the token counts of the data
    stage (``prepare.token_lengths``) both call it, so a count is the length training sees.
    The text is tokenized with ``add_special_tokens=False``; a plain text or prompt/completion
    starts with the BOS token when the tokenizer puts one in front by itself (``bos``: that
    text, worked out once by the caller, or None to ask the tokenizer). ``answer_spans=False``
    skips locating the answers of a chat (a render per turn) and returns no spans; a turn with
    tool calls is still checked, so counting refuses what training refuses. Raises TunelabError
    for chat data without a chat template, or a template that drops a tool call or is not
    prefix-stable.
    """
    eos = tokenizer.eos_token or ""
    if example.kind == "text":
        bos = bos_text(tokenizer) if bos is None else bos
        text = with_bos(bos, example.text or "") + eos
        return text, [(0, len(text))]
    if example.kind == "messages" or chat:
        if not getattr(tokenizer, "chat_template", None):
            if example.kind == "messages":
                raise TunelabError(
                    f"{example.origin}: chat data needs a chat template, but the tokenizer has "
                    "none. Use a chat model or convert the data to prompt/completion."
                )
        messages = as_messages(example, system_prompt)
        if not answer_spans and not any(m.get("tool_calls") for m in messages):
            return render_chat(tokenizer, messages, example.tools), []
        return chat_spans(tokenizer, messages, example.tools, example.origin)
    # plain prompt/completion: the strings are joined as they are after the BOS text (as the
    # tokenizer itself, and so TRL, would start them), the answer ends with EOS
    bos = bos_text(tokenizer) if bos is None else bos
    prompt, completion = example.prompt or "", example.completion or ""
    prompt = prompt if (prompt + completion).startswith(bos) else bos + prompt
    text = prompt + completion + eos
    return text, [(len(prompt), len(text))]


def tokenize_example(
    example: Example, tokenizer: Any, max_length: int, chat: bool, system_prompt: str | None = None
) -> TokenizedExample:
    """Token ids and labels for one example (labels are ``IGNORE_INDEX`` outside the loss)."""
    text, spans = render_example(example, tokenizer, chat, system_prompt)
    return _tokenize_with_spans(tokenizer, text, spans, max_length)


def bos_text(tokenizer: Any) -> str:
    """The BOS token's text when the tokenizer puts it in front by itself (Llama, Mistral and
    Gemma tokenizers do), else "": every plain text, prompt/completion and plain prompt is
    rendered with it, as such a model was pretrained (a chat template writes its own)."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return ""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (tokenizer.bos_token or "") if probe and probe[0] == tokenizer.bos_token_id else ""


def with_bos(bos: str, text: str) -> str:
    """``text`` after the BOS text ``bos`` (``bos_text``), unless it starts with it already: a
    text written with its BOS ("<s>Hello") would start with two, a state no model was trained
    on (llama.cpp warns of it); either way the tokens are BOS + text."""
    return text if text.startswith(bos) else bos + text


def save_tokenized(path: Path, tokenized: list[TokenizedExample]) -> None:
    """Store tokenized examples as flat integer arrays (no pickle: loading runs no code)."""
    import io

    import numpy as np

    from tunelab.files import atomic_write_bytes

    lengths = np.array([len(t.input_ids) for t in tokenized], dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        lengths=lengths,
        input_ids=np.array([i for t in tokenized for i in t.input_ids], dtype=np.int64),
        labels=np.array([i for t in tokenized for i in t.labels], dtype=np.int64),
        truncated=np.array([t.truncated for t in tokenized], dtype=bool),
    )
    atomic_write_bytes(path, buffer.getvalue())


def load_tokenized(path: Path) -> list[TokenizedExample]:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        ids, labels = data["input_ids"].tolist(), data["labels"].tolist()
        out, start = [], 0
        for length, truncated in zip(
            data["lengths"].tolist(), data["truncated"].tolist(), strict=True
        ):
            out.append(
                TokenizedExample(
                    ids[start : start + length], labels[start : start + length], truncated
                )
            )
            start += length
    return out


def tokenize_examples(
    examples: list[Example],
    tokenizer: Any,
    max_length: int,
    chat: bool,
    system_prompt: str | None = None,
    cache_file: Path | None = None,
) -> list[TokenizedExample]:
    """Tokenize every example (or read them back from ``cache_file``); fails when no example
    has a token to learn from."""
    if cache_file is not None and cache_file.is_file():
        return load_tokenized(cache_file)
    tokenized = [tokenize_example(e, tokenizer, max_length, chat, system_prompt) for e in examples]
    empty = [e.origin for e, t in zip(examples, tokenized, strict=True) if t.num_loss_tokens == 0]
    if tokenized and len(empty) == len(tokenized):
        raise TunelabError(
            f"no example has any token to learn from (first: {empty[0]}). Check that the "
            "completions/assistant turns are not empty and max_length leaves room for them."
        )
    if cache_file is not None:
        save_tokenized(cache_file, tokenized)
    return tokenized
