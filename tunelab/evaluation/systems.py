"""The systems compared and the prompt each one sees.

- base: the base model, zero-shot, with the run's system prompt;
- few-shot: the base model shown ``k`` training pairs first (most similar by BM25, or random);
- rag: the base model with the ``k`` training documents that best match the question;
- tuned: the fine-tuned model, prompted exactly as in training;
- tuned+rag: the fine-tuned model with the retrieved documents.

Held-out examples become (question, reference) items: a prompt/completion pair as it is; a chat
by its last user turn and the assistant answer after it; a plain text split in two at a word
boundary, the first ``text_prefix_share`` of words as the prompt to continue and the rest as the
reference (continuations are scored without the chat template, as the model learned them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.schema import Example
from tunelab.data.tokenize import bos_text, with_bos
from tunelab.errors import TunelabError
from tunelab.template_sandbox import render_chat

SYSTEMS = ("base", "few-shot", "rag", "tuned", "tuned+rag")
TUNED_SYSTEMS = ("tuned", "tuned+rag")
FEW_SHOT_CHOICES = ("similar", "random")


@dataclass
class EvalItem:
    question: str
    reference: str
    origin: str
    continuation: bool = False  # a text split into prefix and continuation
    terms: list[str] = field(default_factory=list)
    probe: str = "held-out"  # or a knowledge probe: "reworded", "verbatim" (see probes.py)
    source: str | None = None  # a knowledge probe's training item (its origin)


def to_item(example: Example, text_prefix_share: float = 0.5) -> EvalItem | None:
    """The question and reference of one example; None when it has no answer to score."""
    if example.kind == "prompt_completion":
        return EvalItem(example.prompt or "", example.completion or "", example.origin)
    if example.kind == "messages":
        messages = example.messages or []
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        users = [m for m in messages[: last or 0] if m["role"] == "user"]
        if last is None or not users:
            return None
        if any(m["role"] == "tool" or m.get("tool_calls") for m in messages[: last + 1]):
            return None  # a question/answer pair would drop the calls and results it relies on
        return EvalItem(users[-1]["content"], messages[last]["content"], example.origin)
    words = (example.text or "").split()
    if len(words) < 2:
        return None
    cut = min(max(1, round(len(words) * text_prefix_share)), len(words) - 1)
    return EvalItem(" ".join(words[:cut]), " ".join(words[cut:]), example.origin, True)


def to_items(examples: list[Example], path: str, text_prefix_share: float = 0.5) -> list[EvalItem]:
    items = [to_item(e, text_prefix_share) for e in examples]
    kept = [item for item in items if item is not None]
    if not kept:
        first = examples[0].origin if examples else path
        raise TunelabError(
            f"{path}: no example has a reference answer to score (first: {first}). The eval "
            "file needs prompt/completion pairs (or a prompt_template/completion_template "
            "that builds them), chats that end with an assistant turn, or texts of at least "
            "two words to split into prefix and continuation."
        )
    return kept


def document(item: EvalItem) -> str:
    """A training item as a retrievable document: the question and its answer."""
    return item.reference if not item.question else f"{item.question}\n{item.reference}"


@dataclass
class PromptBuilder:
    """Renders the prompt of each system; holds the training pool and its retriever."""

    tokenizer: Any
    chat: bool
    system_prompt: str | None
    pool: list[EvalItem]
    retriever: Any  # has top_k(query, k) -> list of pool indices
    k: int = 3
    few_shot_choice: str = "similar"
    context_chars: int = 400  # per document or shot answer: prompt length is the eval's cost
    seed: int = 0
    _bos: str | None = field(default=None, init=False, repr=False)  # worked out on first use

    def bos(self) -> str:
        """The BOS text training puts in front of a plain text (``bos_text``), asked once."""
        if self._bos is None:
            self._bos = bos_text(self.tokenizer)
        return self._bos

    def neighbours(self, item: EvalItem, k: int, own_source: bool = False) -> list[EvalItem]:
        """The ``k`` most similar training items, leaving out any that repeat the question (a
        leaked duplicate would make few-shot and RAG look better than they are) and a knowledge
        probe's own training item unless ``own_source`` (retrieval finding it is what a
        knowledge probe measures for RAG; a few-shot shot holding the answer is not)."""
        chosen = []
        for index in self.retriever.top_k(item.question or item.reference, k + 5):
            candidate = self.pool[index]
            if item.source is not None and candidate.origin == item.source:
                keep = own_source
            else:
                keep = candidate.question.strip() != item.question.strip()
            if keep:
                chosen.append(candidate)
            if len(chosen) == k:
                break
        return chosen

    def examples_for(self, item: EvalItem, position: int) -> list[EvalItem]:
        if self.few_shot_choice == "random":
            rng = random.Random(self.seed * 100_003 + position)
            others = [
                p
                for p in self.pool
                if p.question.strip() != item.question.strip() and p.origin != item.source
            ]
            return rng.sample(others, min(self.k, len(others)))
        return self.neighbours(item, self.k)

    def rag_question(self, item: EvalItem) -> str:
        documents = [
            f"[{i}] {_shorten(document(d), self.context_chars)}"
            for i, d in enumerate(self.neighbours(item, self.k, own_source=True), start=1)
        ]
        context = "\n\n".join(documents)
        if item.continuation:
            return f"{context}\n\n{item.question}"
        return (
            f"Reference documents:\n\n{context}\n\nUse the documents where they help.\n\n"
            f"{item.question}"
        )

    def messages(self, system: str, item: EvalItem, position: int) -> list[dict[str, str]]:
        """The chat a system sees before its answer (chat runs only)."""
        turns: list[dict[str, str]] = []
        if self.system_prompt:
            turns.append({"role": "system", "content": self.system_prompt})
        if system == "few-shot":
            for shot in self.examples_for(item, position):
                turns += [
                    {"role": "user", "content": shot.question},
                    {"role": "assistant", "content": _shorten(shot.reference, self.context_chars)},
                ]
        question = self.rag_question(item) if system.endswith("rag") else item.question
        return turns + [{"role": "user", "content": question}]

    def render(self, system: str, item: EvalItem, position: int) -> tuple[str, str]:
        """(prompt, scored text) of ``system`` on ``item``: the exact text the model continues,
        and that text followed by the reference as the model would have to produce it."""
        if system not in SYSTEMS:
            raise TunelabError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}.")
        eos = self.tokenizer.eos_token or ""
        if self.chat and not item.continuation:
            messages = self.messages(system, item, position)
            prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
            # the template's own end-of-turn closes the answer, as in training
            answer = {"role": "assistant", "content": item.reference}
            full = render_chat(self.tokenizer, messages + [answer])
            return prompt, full if full.startswith(prompt) else prompt + item.reference + eos
        # plain runs trained on prompt + completion joined as they are, so shots are too
        joiner = " " if item.continuation else ""
        if system == "few-shot":
            shots = self.examples_for(item, position)
            prefix = "".join(
                f"{s.question}{joiner}{_shorten(s.reference, self.context_chars)}\n\n"
                for s in shots
            )
            prompt = prefix + item.question
        else:
            prompt = self.rag_question(item) if system.endswith("rag") else item.question
        prompt = with_bos(self.bos(), prompt)  # each plain text starts so in training
        # a trailing space belongs to the answer's first token in training (see render_prompt)
        return prompt.rstrip(" \t"), prompt + joiner + item.reference + eos


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + "..."
