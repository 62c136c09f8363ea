"""Teacher-forced loss of reference answers, and timed batched generation.

Both sort the examples by length before batching (less padding, so fewer wasted positions)
and put the results back in the original order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tunelab.generation import LoadedModel, generate_from_text


@dataclass
class ReferenceLoss:
    nll_sum: float  # summed negative log-likelihood of the reference tokens, in nats
    tokens: int

    @property
    def loss(self) -> float | None:
        return self.nll_sum / self.tokens if self.tokens else None


def encode_scored(
    tokenizer: Any, prompt: str, full: str, max_tokens: int
) -> tuple[list[int], int, bool]:
    """Token ids of ``full``, the index of the first token after ``prompt``, and whether the
    text was cut; long inputs lose tokens from the left, so the reference is scored whole, and
    keep a leading BOS (as llama.cpp keeps it when it shifts its context): every text the model
    was trained on starts with it."""
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    # the first token holding a character of the reference: a prompt ending in a space shares
    # its last token with the reference's first word (" Oslo"), which is part of the answer
    first = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    cut = max(len(ids) - max_tokens, 0)
    if cut:
        keep = int(ids[0] == getattr(tokenizer, "bos_token_id", None))
        ids, first = ids[:keep] + ids[cut + keep :], max(first - cut, 1)
    return ids, max(first, 1), cut > 0  # the first token has nothing before it to predict it


def reference_losses(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    full_texts: list[str],
    batch_size: int = 8,
    max_tokens: int = 2048,
) -> list[ReferenceLoss]:
    """Loss of each ``full_texts[i]`` after ``prompts[i]``, only on the tokens past the prompt."""
    import torch
    import torch.nn.functional as F

    from tunelab.training.loss import decoder_and_head

    encoded = [
        encode_scored(tokenizer, p, f, max_tokens)[:2]
        for p, f in zip(prompts, full_texts, strict=True)
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    results: list[ReferenceLoss] = [ReferenceLoss(0.0, 0)] * len(encoded)
    device = next(model.parameters()).device
    split = decoder_and_head(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            tokens = encoded[index][0]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            if split is not None:  # the LM head only on the reference positions
                body, head = split
                hidden = body(input_ids=ids, attention_mask=mask, use_cache=False)
                hidden = hidden.last_hidden_state
            else:
                logits_all = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, index in enumerate(chunk):
                tokens, first = encoded[index]
                targets = ids[row, first : len(tokens)]
                if targets.numel() == 0:
                    results[index] = ReferenceLoss(0.0, 0)
                    continue
                if split is not None:
                    logits = head(hidden[row, first - 1 : len(tokens) - 1])
                else:
                    logits = logits_all[row, first - 1 : len(tokens) - 1]
                nll = F.cross_entropy(logits.float(), targets, reduction="sum")
                results[index] = ReferenceLoss(float(nll), int(targets.numel()))
    return results


@dataclass
class Generated:
    answers: list[str]
    seconds: float
    new_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def timed_generation(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    repetition_penalty: float = 1.0,
) -> Generated:
    """Greedy answers to already-rendered prompts, with wall time and answer token count
    (answers re-tokenized, so a stop token is not counted)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    started = time.perf_counter()
    ordered = generate_from_text(
        loaded,
        [prompts[i] for i in order],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        repetition_penalty=repetition_penalty,
    )
    seconds = time.perf_counter() - started
    for index, answer in zip(order, ordered, strict=True):
        answers[index] = answer
    tokenizer = loaded.tokenizer
    new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return Generated(answers, seconds, new_tokens)
