"""Cross-entropy on the loss tokens only, without materialising logits anywhere else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.training.families import logit_transform

# Rows of logits per chunk (evaluation) and per matrix multiplication (training). With a 49k
# vocabulary, 1,024 rows of fp32 logits are 200 MB: every softmax pass over them went to
# memory. Measured on 2,048 tokens of SmolLM2's head, loss and gradient alone: 1,024-row
# chunks 941 ms, 128-row chunks 837 ms (the matmuls slow down), 1,024-row matmuls with the
# softmax 32 rows at a time 746 ms; in whole training steps 512/64 measured best (within 1%).
CHUNK_ROWS = 128
BLOCK_ROWS = 512
SOFTMAX_ROWS = 64


class LogitHead(nn.Module):
    """An LM head and what the family's forward does to its logits after it:
    ``cap * tanh(scale * head(x) / cap)`` (Gemma 2/3 soft-cap, Granite and Cohere scale;
    without ``cap``, ``scale * head(x)``). (N, hidden) -> (N, vocab) logits."""

    def __init__(self, linear: nn.Module, scale: float, softcap: float | None) -> None:
        super().__init__()
        self.linear, self.scale, self.softcap = linear, scale, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return transform_logits(self.linear(hidden), self.scale, self.softcap)


def transform_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The family's scaling and soft-capping, in transformers' order (scale, then cap)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


_stock: list[bool] = [False]


@contextmanager
def stock_loss() -> Iterator[None]:
    """For a run with the fast loss turned off: the loss comes from the model's own forward."""
    _stock[0] = True
    try:
        yield
    finally:
        _stock[0] = False


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The transformer body and LM head of a (PEFT-wrapped) causal LM, or None when the model
    cannot be split (then the full forward is used). The head is a :class:`LogitHead` when
    the family scales or soft-caps its logits; a family not in tunelab's table
    (training.families) is not split, since its forward may do more after the head."""
    transform = logit_transform(model)
    if transform is None:
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return None  # virtual tokens are added by PeftModel.forward, so it must run whole
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", None)
    body = getattr(base, prefix, None) if prefix else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or head is None or body is base:
        return None
    scale, softcap = transform
    if scale != 1.0 or softcap:
        head = LogitHead(head, scale, softcap)
    return body, head


def chunked_cross_entropy(
    hidden: torch.Tensor, head: Any, targets: torch.Tensor, chunk_size: int = CHUNK_ROWS
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, a chunk of rows at a time,
    in fp32 (bf16 logits lose too much precision in the log-softmax)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()
        total = total + F.cross_entropy(
            logits, targets[start : start + chunk_size], reduction="sum"
        )
    return total


# the fused loss's scratch buffers, kept from one micro-batch to the next: a 50 MB logits
# block is above glibc's largest mmap threshold, so a fresh one each micro-batch was 12,000
# page faults (48 MiB zeroed again) every time
_scratch_buffers: dict[str, Any] = {}


def _scratch(*specs: tuple[tuple[int, int], torch.dtype], device: torch.device) -> list[Any]:
    """Empty tensors of the given (shape, dtype), reused while the same ones are asked for."""
    key = (specs, device)
    if _scratch_buffers.get("key") != key:
        _scratch_buffers.clear()  # the old ones go before the new ones come
        buffers = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
        _scratch_buffers.update(key=key, value=buffers)
    return _scratch_buffers["value"]


def release_scratch() -> None:
    """Free the fused loss's buffers (at the end of a run)."""
    _scratch_buffers.clear()


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` whose gradient is computed in the forward
    pass, for a frozen head: the logits (and their fp32 log-softmax) of a whole micro-batch are
    never kept for the backward, and the backward is one multiplication.

    Logits come ``block`` rows per matrix multiplication (large, so it runs near peak); the
    softmax works through them SOFTMAX_ROWS rows at a time in fp32, small enough to stay in
    cache over its passes, and writes the gradient of the logits back over them in place."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        block: int,
        scale: float = 1.0,
        softcap: float | None = None,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        # one logits block and two fp32 slice buffers, reused: a fresh 50 MB block or 12 MB
        # slice is fresh pages from the OS each time, whose faults and zeroing cost more than
        # the softmax's own passes (807 -> 699 ms for 2,048 tokens' loss and gradient)
        rows_kept = min(SOFTMAX_ROWS, hidden.shape[0])
        vocab = weight.shape[0]
        slice_spec = ((SOFTMAX_ROWS, vocab), torch.float32)
        blocks, upcast, softmax, *slopes = _scratch(
            ((block, vocab), hidden.dtype),
            slice_spec,
            slice_spec,
            *([slice_spec] if softcap else []),
            device=hidden.device,
        )
        positions = torch.arange(rows_kept, device=hidden.device)
        for start in range(0, hidden.shape[0], block):
            chunk = hidden[start : start + block]
            logits = torch.mm(chunk, weight.t(), out=blocks[: chunk.shape[0]])  # compute dtype
            for first in range(0, logits.shape[0], SOFTMAX_ROWS):
                part = logits[first : first + SOFTMAX_ROWS]
                count = part.shape[0]
                wanted = targets[start + first : start + first + count]
                rows = upcast[:count].copy_(part)
                if scale != 1.0:
                    rows.mul_(scale)
                if softcap:  # rows = cap * tanh(rows / cap); its slope 1 - tanh^2 kept
                    rows.div_(softcap).tanh_()
                    slope = torch.mul(rows, rows, out=slopes[0][:count]).neg_().add_(1.0)
                    rows.mul_(softcap)
                # torch's softmax works a row at a time (a 49k-vocabulary row stays in cache
                # over its passes): 2.5 -> 1.5 ms a slice against max/sub/exp/sum/div over it
                probabilities = torch.softmax(rows, -1, out=softmax[:count])
                target_cells = (positions[:count], wanted)
                picked = probabilities[target_cells]
                losses = -picked.log()
                # a target far below the top logit underflows to probability 0: take its loss
                # from the logits (log-sum-exp minus the target's logit)
                underflow = picked < 1e-30
                if bool(underflow.any()):
                    lost = underflow.nonzero().flatten()
                    losses[lost] = torch.logsumexp(rows[lost], -1) - rows[lost, wanted[lost]]
                total += losses.sum()
                # d(sum of losses)/d(logits) = softmax - one_hot(target)
                probabilities[target_cells] -= 1.0
                if softcap:  # chain rule through the cap, then the scale
                    probabilities.mul_(slope)
                if scale != 1.0:
                    probabilities.mul_(scale)
                part.copy_(probabilities)
            torch.mm(logits, weight, out=grad_hidden[start : start + block])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, head: Any, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)``: fused (gradient in the forward) when training
    through a frozen, bias-free linear head, else chunked with autograd (a trained head or
    embedding needs its own gradient, and evaluation needs none). ``chunk_size`` overrides
    the rows per chunk (CHUNK_ROWS) or per fused block (BLOCK_ROWS). A :class:`LogitHead`'s
    scale and soft-cap are part of the fused gradient."""
    scale, softcap, linear = 1.0, None, head
    if isinstance(head, LogitHead):
        scale, softcap, linear = head.scale, head.softcap, head.linear
    fused = (
        type(linear) is torch.nn.Linear
        and linear.bias is None
        and not linear.weight.requires_grad
        and hidden.requires_grad
        and torch.is_grad_enabled()
    )
    if not fused:
        return chunked_cross_entropy(hidden, head, targets, chunk_size or CHUNK_ROWS)
    weight = linear.weight
    if torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        hidden = hidden.to(weight.dtype)
    # once per call, not per chunk: the chunks' gradient matmul needs hidden's dtype
    weight = weight.to(hidden.dtype)
    block = chunk_size or BLOCK_ROWS
    return _LinearCrossEntropy.apply(hidden, weight, targets, block, scale, softcap)


def causal_lm_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed loss, number of loss tokens) of one batch.

    Only positions whose next token is a target go through the LM head: with a 49k vocabulary
    the head is a large share of the compute, and prompt tokens need none of it.
    """
    input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch["position_ids"]
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    split = None if _stock[0] else decoder_and_head(model)
    if split is not None:
        body, head = split
        hidden = body(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        chosen = hidden[:, :-1][selected]
    else:
        prompt_learning = getattr(
            getattr(model, "active_peft_config", None), "is_prompt_learning", False
        )
        logits = model(
            input_ids=input_ids,
            # PEFT's prompt methods take no position_ids (rows then hold one example each)
            position_ids=None if prompt_learning else position_ids,
            use_cache=False,
        ).logits
        # prompt tuning returns logits for its virtual tokens too: keep the real positions
        logits = logits[:, -input_ids.shape[1] :]
        chosen_logits = logits[:, :-1][selected].float()
        return F.cross_entropy(chosen_logits, targets[selected], reduction="sum"), count
    if count == 0:
        return chosen.sum() * 0.0, 0
    return linear_cross_entropy(chosen, head, targets[selected]), count
