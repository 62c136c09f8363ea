"""Forgetting: perplexity on general prose outside the user's domain, before and after tuning.

The text ships with tunelab (``data/general_text.txt``, public-domain prose; sources in
``data/SOURCES.md``). It is cut into passages of whole paragraphs of about ``passage_words``
words. Each passage is scored as a pretrained model reads a document: after the BOS token when
the tokenizer puts one in front by itself (Llama-2 style; every token of the passage is then
scored), else from its second token (the first has nothing before it).
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from tunelab.data.tokenize import bos_text
from tunelab.evaluation.scoring import reference_losses


def general_passages(passage_words: int = 180) -> list[str]:
    text = (
        resources.files("tunelab.evaluation")
        .joinpath("data/general_text.txt")
        .read_text(encoding="utf-8")
    )
    passages, current = [], []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        current.append(paragraph)
        if sum(len(p.split()) for p in current) >= passage_words:
            passages.append("\n\n".join(current))
            current = []
    if current:
        passages.append("\n\n".join(current))
    return passages


def general_perplexity(
    model: Any, tokenizer: Any, passages: list[str] | None = None, batch_size: int = 8
) -> dict[str, float]:
    """Token-weighted loss and perplexity of ``model`` on ``passages`` (default: the shipped
    general text)."""
    passages = general_passages() if passages is None else passages
    bos = bos_text(tokenizer)
    losses = reference_losses(
        model, tokenizer, [bos] * len(passages), [bos + p for p in passages],
        batch_size=batch_size, max_tokens=512,
    )  # fmt: skip
    nll = sum(item.nll_sum for item in losses)
    tokens = sum(item.tokens for item in losses)
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
