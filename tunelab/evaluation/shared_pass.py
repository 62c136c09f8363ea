"""The reference loss and the generated answer of each prompt from one pass over its tokens.

Scoring a reference needs a forward over prompt + reference; generating an answer needs a
forward over the prompt. The prompt is the long part (few-shot shots, RAG documents), so the two
share it: each batch is laid out with the prompts left-padded to end in the same column and the
references after them (right-padded)::

    [pad pad p p p p | r r r pad]
    [p p p p p p p p | r r r r r]

One forward gives the loss on the reference positions, the logits that choose the first answer
token (the position before the first reference token predicts both), and a KV cache that, cut
back to the prompt column, is exactly the cache a left-padded generation would have built. Greedy
decoding continues from it. Positions come from the attention mask as in ``generate``, so a
padded row sees the same positions as it would alone.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

from tunelab.evaluation.scoring import (
    Generated,
    ReferenceLoss,
    encode_scored,
    reference_losses,
    timed_generation,
)
from tunelab.generation import LoadedModel

# generation-config settings that add logits processors of their own: a model that sets any of
# them is decoded by ``generate`` itself rather than by the plain greedy loop here
_PROCESSOR_SETTINGS = (
    "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "min_new_tokens", "min_length",
    "sequence_bias", "encoder_repetition_penalty", "exponential_decay_length_penalty",
)  # fmt: skip


@dataclass
class SharedPass:
    losses: list[ReferenceLoss]
    answers: list[str]
    forward_seconds: float  # the shared forward over prompt + reference
    decode_seconds: float  # the greedy steps after it
    prompt_tokens: int
    reference_tokens: int


def score_and_generate(
    loaded: LoadedModel,
    prompts: list[str],
    full_texts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    repetition_penalty: float = 1.0,
) -> tuple[list[ReferenceLoss], Generated, float]:
    """(reference losses, greedy answers, seconds spent on the losses) of every prompt, the
    prompt's tokens processed once where the model and the text allow (see ``prepare``), else
    by a loss pass and ``generate`` apart. Of the shared forward's time, the prompt tokens'
    share counts as generation (a user generating pays it) and the references' as loss."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prepared = (
        prepare(tokenizer, prompts, full_texts) if can_share(model) else [None] * len(prompts)
    )
    shared = [i for i, p in enumerate(prepared) if p is not None]
    apart = [i for i, p in enumerate(prepared) if p is None]
    losses = [ReferenceLoss(0.0, 0)] * len(prompts)
    answers = [""] * len(prompts)
    generation_seconds = loss_seconds = 0.0
    if shared:
        result = shared_pass(
            model, tokenizer, [p for p in prepared if p is not None], max_new_tokens, batch_size,
            repetition_penalty,
        )  # fmt: skip
        prompt_share = result.prompt_tokens / max(result.prompt_tokens + result.reference_tokens, 1)
        generation_seconds += result.decode_seconds + result.forward_seconds * prompt_share
        loss_seconds += result.forward_seconds * (1 - prompt_share)
        for position, index in enumerate(shared):
            losses[index], answers[index] = result.losses[position], result.answers[position]
    if apart:
        t0 = time.perf_counter()
        apart_losses = reference_losses(
            model, tokenizer, [prompts[i] for i in apart], [full_texts[i] for i in apart],
            batch_size,
        )  # fmt: skip
        loss_seconds += time.perf_counter() - t0
        generated = timed_generation(
            loaded, [prompts[i] for i in apart], max_new_tokens, batch_size, repetition_penalty
        )
        generation_seconds += generated.seconds
        for position, index in enumerate(apart):
            losses[index], answers[index] = apart_losses[position], generated.answers[position]
    # answers re-tokenized, as timed_generation counts them, so a stop token is not counted
    new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return losses, Generated(answers, generation_seconds, new_tokens), loss_seconds


def can_share(model: Any) -> bool:
    """Whether ``model`` can be split into body and head and decoded by the plain greedy loop
    (prompt-learning adapters add virtual tokens in the wrapper's forward, so they cannot)."""
    from tunelab.training.loss import decoder_and_head

    if decoder_and_head(model) is None:
        return False
    config = getattr(model, "generation_config", None)
    return not any(getattr(config, name, None) for name in _PROCESSOR_SETTINGS)


def prepare(
    tokenizer: Any, prompts: list[str], full_texts: list[str], max_tokens: int = 2048
) -> list[tuple[list[int], list[int]] | None]:
    """(prompt ids, reference ids) of each item, or None where the two cannot share a pass: the
    text was cut to ``max_tokens``, or the prompt alone tokenizes differently from the start of
    prompt + reference (generation must see the prompt's own tokens)."""
    prepared: list[tuple[list[int], list[int]] | None] = []
    for prompt, full in zip(prompts, full_texts, strict=True):
        ids, first, cut = encode_scored(tokenizer, prompt, full, max_tokens)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        shared = not cut and prompt_ids and ids[:first] == prompt_ids
        prepared.append((prompt_ids, ids[first:]) if shared else None)
    return prepared


def shared_pass(
    model: Any,
    tokenizer: Any,
    items: list[tuple[list[int], list[int]]],
    max_new_tokens: int,
    batch_size: int = 8,
    repetition_penalty: float = 1.0,
) -> SharedPass:
    """Reference loss and greedy answer of every (prompt ids, reference ids) item, batched in
    the order that pads least (``_batch_order``); results in the original order."""
    import torch

    from tunelab.training.loss import decoder_and_head

    split = decoder_and_head(model)
    assert split is not None, "shared_pass is called only where can_share(model)"
    body, head = split
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = _batch_order(items, batch_size)
    losses = [ReferenceLoss(0.0, 0)] * len(items)
    tokens: list[list[int]] = [[] for _ in items]
    forward_seconds = decode_seconds = 0.0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [items[i] for i in chunk]
        ids, mask, width = _layout(batch, pad)
        ids, mask = ids.to(device), mask.to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            cache, first_logits, chunk_losses = _forward(body, head, ids, mask, width, batch)
        t1 = time.perf_counter()
        with torch.no_grad():
            new = _greedy(
                body, head, cache, first_logits, ids[:, :width], mask[:, :width],
                max_new_tokens, tokenizer.eos_token_id, pad, repetition_penalty,
            )  # fmt: skip
        t2 = time.perf_counter()
        forward_seconds, decode_seconds = forward_seconds + t1 - t0, decode_seconds + t2 - t1
        for row, index in enumerate(chunk):
            losses[index] = chunk_losses[row]
            tokens[index] = new[row]
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return SharedPass(
        losses,
        [t.strip() for t in texts],
        forward_seconds,
        decode_seconds,
        sum(len(p) for p, _ in items),
        sum(len(r) for _, r in items),
    )


def _batch_order(items: list[tuple[list[int], list[int]]], batch_size: int) -> list[int]:
    """Item order for batching: by prompt length (long, varied prompts: few-shot, RAG) or by
    total length (short prompts, where the references vary most), whichever pads less."""
    by_prompt = sorted(range(len(items)), key=lambda i: (len(items[i][0]), len(items[i][1])))
    by_total = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))

    def padded(order: list[int]) -> int:  # positions the forward computes, padding included
        total = 0
        for start in range(0, len(order), batch_size):
            batch = [items[i] for i in order[start : start + batch_size]]
            total += len(batch) * (max(len(p) for p, _ in batch) + max(len(r) for _, r in batch))
        return total

    return min((by_prompt, by_total), key=padded)


def _layout(batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, int]:
    """Token ids and mask of a batch, prompts ending in column ``width``, references after."""
    import torch

    width = max(len(p) for p, _ in batch)
    total = width + max(len(r) for _, r in batch)
    ids = torch.full((len(batch), total), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), total), dtype=torch.long)
    for row, (prompt, reference) in enumerate(batch):
        tokens = torch.tensor(prompt + reference, dtype=torch.long)
        ids[row, width - len(prompt) : width + len(reference)] = tokens
        mask[row, width - len(prompt) : width + len(reference)] = 1
    return ids, mask, width


def _positions(mask: Any) -> Any:
    # as generate computes them: count real tokens, so left padding does not shift positions
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _cache_argument(body: Any) -> str:
    # transformers 5.x renamed past_key_values to cache; accept either
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _forward(
    body: Any, head: Any, ids: Any, mask: Any, width: int, batch: list[tuple[list[int], list[int]]]
) -> tuple[Any, Any, list[ReferenceLoss]]:
    """One forward over the batch: the prompt's KV cache, the logits for the first answer
    token, and each reference's loss (logits only where a reference token is predicted)."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    cache = DynamicCache(config=body.config)
    hidden = body(
        input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
        **{_cache_argument(body): cache},
    ).last_hidden_state  # fmt: skip
    first_logits = head(hidden[:, width - 1]).float()
    losses = []
    for row, (_, reference) in enumerate(batch):
        if not reference:
            losses.append(ReferenceLoss(0.0, 0))
            continue
        logits = head(hidden[row, width - 1 : width - 1 + len(reference)]).float()
        nll = F.cross_entropy(logits, ids[row, width : width + len(reference)], reduction="sum")
        losses.append(ReferenceLoss(float(nll), len(reference)))
    extra = ids.shape[1] - width
    if extra:
        cache.crop(-extra)  # keep the prompt's keys and values only
    return cache, first_logits, losses


def _greedy(
    body: Any,
    head: Any,
    cache: Any,
    logits: Any,
    ids: Any,
    mask: Any,
    max_new_tokens: int,
    eos: int | None,
    pad: int,
    repetition_penalty: float,
) -> list[list[int]]:
    """Greedy tokens of each row as ``generate`` picks them (repetition penalty over the
    prompt and answer so far, padding after the stop token), from the prompt's cache and the
    logits of its last position. Finished rows leave the batch once a quarter of it is done."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    penalise = RepetitionPenaltyLogitsProcessor(repetition_penalty)  # as generate applies it
    rows = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    active = torch.arange(rows)  # original row of each row still decoding
    seen = ids  # what the repetition penalty looks at, as generate's input_ids
    positions = _positions(mask)[:, -1]
    argument = _cache_argument(body)
    finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0:
            logits = penalise(seen, logits)
        chosen = logits.argmax(-1)
        for row, token, over in zip(
            active.tolist(), chosen.tolist(), finished.tolist(), strict=True
        ):
            if not over:
                out[row].append(token)
        if eos is not None:
            finished = finished | (chosen == eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        # finished rows run on (their tokens are dropped: rows never see each other) until a
        # quarter of the batch is done, then leave it: copying the cache on every single stop
        # would cost more than the steps it saves
        if int(finished.sum()) * 4 >= finished.numel():
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, chosen, seen = active[keep], chosen[keep], seen[keep]
            mask, positions, finished = mask[keep], positions[keep], finished[keep]
        seen = torch.cat([seen, chosen[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions + 1
        hidden = body(
            input_ids=chosen[:, None], attention_mask=mask, position_ids=positions[:, None],
            use_cache=True, **{argument: cache},
        ).last_hidden_state  # fmt: skip
        logits = head(hidden[:, -1]).float()
    return out
