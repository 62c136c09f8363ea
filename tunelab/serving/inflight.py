"""Continuous (in-flight) batching: the rows of one adapter decode together, one token per step;
new requests are prefilled and merged into the running batch at a step boundary, and finished
or cancelled rows leave at once.

A batch is a plain transformers ``DynamicCache`` whose rows are left-padded to one length, with
a 2-D attention mask over its columns and each row's next position id, the same layout
``generate`` uses for a left-padded batch; so a row's greedy tokens are the ones ``generate``
(and ``tunelab generate``) picks for it. Models whose cache is not made of plain full-attention
layers (sliding windows, recurrent states), or whose generation config asks for logits
processing this loop does not do, are served by the whole-batch ``generate`` path instead
(``continuous_unsupported`` says why).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.serving.jobs import Job

# Generation-config settings that make ``generate`` change the logits before picking a token;
# the step loop applies only temperature and top_p (per request), so a model that sets any of
# these is served by ``generate`` itself.
_PROCESSING = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "diversity_penalty": 0.0,
    "exponential_decay_length_penalty": None,
}


def continuous_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot be served by the step loop, or None when it can."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        cache = DynamicCache(config=base.config)
    except Exception as exc:  # noqa: BLE001 - a family transformers builds no cache for
        return f"its cache cannot be built ({type(exc).__name__}: {exc})"
    kinds = sorted({type(layer).__name__ for layer in cache.layers} - {"DynamicLayer"})
    if kinds or not cache.layers or not all(type(x) is DynamicLayer for x in cache.layers):
        return f"its cache has {', '.join(kinds) or 'no'} layers (only full attention is merged)"
    generation = getattr(base, "generation_config", None)
    for key, neutral in _PROCESSING.items():
        value = getattr(generation, key, neutral)
        if value not in (neutral, None) and value != neutral:
            return f"its generation config sets {key}={value!r}"
    return None


@dataclass
class Batch:
    """The rows of one adapter in flight.

    ``cache`` holds keys/values of shape (rows, heads, columns, head_dim) per layer, rows
    left-padded to one column count; ``mask`` (rows, columns) is 1 where a column is real;
    ``next_ids`` (rows, 1) are the tokens picked last, not yet run; ``positions`` (rows,) their
    position ids.
    """

    jobs: list[Job]
    cache: Any
    mask: Any
    next_ids: Any
    positions: Any


@functools.cache
def _forward_parameters(model_class: Any) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _forward(model: Any, cache: Any, **inputs: Any) -> Any:
    """``model``'s forward pass on ``inputs`` with ``cache``, only the last position's logits,
    under the keyword names this transformers version uses (``past_key_values`` became
    ``cache`` in 5.x), as ``generate`` calls it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = _forward_parameters(base.__class__)
    inputs["cache" if "cache" in accepted else "past_key_values"] = cache
    if "logits_to_keep" in accepted:
        inputs["logits_to_keep"] = 1
    return model(use_cache=True, **inputs)


def adapter_context(model: Any, adapter: str | None) -> Any:
    """The context under which ``model`` runs as ``adapter`` (None: the bare base model)."""
    import torch

    if adapter is None and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    if adapter is not None:
        model.set_adapter(adapter)
    return torch.no_grad()


def prefill(model: Any, jobs: list[Job]) -> tuple[Batch | None, list[Job]]:
    """Run the prompts of ``jobs`` (one adapter) left-padded in one forward pass and pick each
    row's first token. Returns the batch of the rows still going (None if none) and the jobs
    that finished with that token."""
    import torch

    pad = jobs[0].served.tokenizer.pad_token_id or 0
    longest = max(len(job.prompt_ids) for job in jobs)
    device = next(model.parameters()).device
    input_ids = torch.tensor(
        [[pad] * (longest - len(job.prompt_ids)) + job.prompt_ids for job in jobs], device=device
    )
    mask = torch.tensor(
        [[0] * (longest - len(job.prompt_ids)) + [1] * len(job.prompt_ids) for job in jobs],
        device=device,
    )
    # as generate derives them for a left-padded batch
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = DynamicCache(config=base.config)
    with adapter_context(model, jobs[0].served.adapter), torch.no_grad():
        out = _forward(
            model, cache, input_ids=input_ids, attention_mask=mask, position_ids=position_ids
        )
    # the forward pass filled ``cache`` in place
    batch = Batch(jobs, cache, mask, None, mask.sum(-1))
    tokens = pick_tokens(out.logits[:, -1, :].float(), jobs)
    return _advance(batch, tokens)


def step(model: Any, batch: Batch) -> tuple[Batch | None, list[Job]]:
    """One decode step for every row of ``batch``: run the last picked tokens, pick the next.
    Returns the batch of the rows still going (None if none) and the jobs that finished."""
    import torch

    ones = torch.ones((len(batch.jobs), 1), dtype=batch.mask.dtype, device=batch.mask.device)
    batch.mask = torch.cat([batch.mask, ones], dim=1)
    with adapter_context(model, batch.jobs[0].served.adapter), torch.no_grad():
        out = _forward(
            model,
            batch.cache,
            input_ids=batch.next_ids,
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
        )
    batch.positions = batch.positions + 1
    tokens = pick_tokens(out.logits[:, -1, :].float(), batch.jobs)
    return _advance(batch, tokens)


def pick_tokens(logits: Any, jobs: list[Job]) -> list[int]:
    """Each row's next token: the argmax for a greedy request; otherwise a sample after
    temperature and top_p, as ``generate`` draws it (softmax, then ``torch.multinomial``), from
    the request's own seeded generator when it gave a seed. ``logits`` is (rows, vocab)."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    tokens = logits.argmax(-1).tolist()
    for row, job in enumerate(jobs):
        if job.greedy:
            continue
        scores = logits[row : row + 1]
        scores = TemperatureLogitsWarper(job.temperature)(None, scores)
        if job.top_p < 1.0:
            scores = TopPLogitsWarper(job.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=job.generator()).item())
    return tokens


def _advance(batch: Batch, tokens: list[int]) -> tuple[Batch | None, list[Job]]:
    import torch

    from tunelab.serving.jobs import accept_token

    pairs = zip(batch.jobs, tokens, strict=True)
    finished = [job for job, token in pairs if accept_token(job, token)]
    batch.next_ids = torch.tensor(tokens, device=batch.mask.device)[:, None]
    keep = [row for row, job in enumerate(batch.jobs) if job.finish_reason is None]
    return select_rows(batch, keep), finished


def select_rows(batch: Batch, keep: list[int]) -> Batch | None:
    """``batch`` with only the rows ``keep`` (None when empty), its columns that are padding in
    every remaining row cut from the left."""
    import torch

    if not keep:
        return None
    if len(keep) < len(batch.jobs):
        index = torch.tensor(keep, device=batch.mask.device)
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        batch.jobs = [batch.jobs[row] for row in keep]
        batch.mask = batch.mask.index_select(0, index)
        batch.next_ids = batch.next_ids.index_select(0, index)
        batch.positions = batch.positions.index_select(0, index)
    first = int(batch.mask.any(0).int().argmax())  # first column some row uses
    if first:
        for layer in batch.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        batch.mask = batch.mask[:, first:]
    return batch


def merge(running: Batch | None, joining: Batch | None) -> Batch | None:
    """One batch of the rows of both (same adapter): the shorter one left-padded with masked
    zero columns, rows of ``running`` first."""
    import torch

    if running is None or joining is None:
        return running or joining
    width = max(running.mask.shape[1], joining.mask.shape[1])

    def pad(tensor: Any, dim: int) -> Any:
        missing = width - tensor.shape[dim]
        if not missing:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for mine, theirs in zip(running.cache.layers, joining.cache.layers, strict=True):
        mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], dim=0)
        mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], dim=0)
    running.mask = torch.cat([pad(running.mask, 1), pad(joining.mask, 1)], dim=0)
    running.next_ids = torch.cat([running.next_ids, joining.next_ids], dim=0)
    running.positions = torch.cat([running.positions, joining.positions], dim=0)
    running.jobs = running.jobs + joining.jobs
    return running
