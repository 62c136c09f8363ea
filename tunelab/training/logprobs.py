"""Per-sequence log-probabilities of packed sequences, without materialising all the logits.

Preference objectives score whole answers: the sum (or mean) of the log-probabilities of an
answer's tokens. Chosen and rejected answers are packed into rows like SFT examples (positions
restart per sequence, so attention stays inside each one); each target token carries the
index of its sequence, and the per-token log-probabilities are summed per sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.training import loss as loss_module
from tunelab.training.loss import CHUNK_ROWS, decoder_and_head

# rows of the fused head's logits in flight at once: its blocks (logits, their log-softmax and
# gradient, ~10 bytes x vocabulary per row) are made at the end of the forward, when every
# activation is still held, so they add to the step's peak; 256 rows (not the SFT loss's 512)
# take ~120 MiB less at a 49k vocabulary, give the same values bit for bit (each row's
# log-probability is its own) and keep the matrix products large enough to run as fast
BLOCK_ROWS = 256


class _LinearTokenLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[target]`` per row, for a frozen head, with the gradient
    of each row's log-probability computed in the forward pass: a row's log-probability depends
    on its own hidden state only, so the backward is each saved row gradient times the row's
    incoming gradient, and no logits are kept for it."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, block: int
    ) -> torch.Tensor:
        picked = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], block):
            chunk = hidden[start : start + block]
            wanted = targets[start : start + block]
            log_probs = torch.log_softmax(torch.mm(chunk, weight.t()).float(), -1)
            cells = (torch.arange(chunk.shape[0], device=hidden.device), wanted)
            picked[start : start + block] = log_probs[cells]
            # d log p[target] / d logits = one_hot(target) - softmax
            grad_logits = log_probs.exp_().neg_()
            grad_logits[cells] += 1.0
            grad_hidden[start : start + block] = torch.mm(grad_logits.to(weight.dtype), weight)
        ctx.save_for_backward(grad_hidden)
        return picked

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype)[:, None], None, None, None


def token_logprobs(hidden: torch.Tensor, head: Any, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability (fp32) of each target under ``head(hidden)``; ``hidden`` is (n, width),
    ``targets`` (n,). Fused (gradient in the forward) when training through a frozen,
    bias-free linear head, else chunked with autograd."""
    fused = (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and hidden.requires_grad
        and torch.is_grad_enabled()
    )
    if fused:
        weight = head.weight
        if torch.is_autocast_enabled(hidden.device.type):
            weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        hidden = hidden.to(weight.dtype)
        return _LinearTokenLogprobs.apply(hidden, weight, targets, BLOCK_ROWS)
    pieces = []
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        logits = head(hidden[start : start + CHUNK_ROWS]).float()
        wanted = targets[start : start + CHUNK_ROWS]
        pieces.append(-F.cross_entropy(logits, wanted, reduction="none"))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(
    model: Any, batch: dict[str, torch.Tensor], sequence_index: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, number of target tokens) of each of ``num_sequences`` packed
    sequences, both of shape (num_sequences,).

    ``sequence_index`` (batch, width) gives, for each token position, the sequence it belongs
    to (-1 for padding); a target at position p+1 is counted for the sequence of position p+1,
    and each sequence's first token is never a target, so no sequence scores another's tokens.
    """
    input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch["position_ids"]
    targets = labels[:, 1:]
    owner = sequence_index[:, 1:]
    selected = (targets != IGNORE_INDEX) & (owner >= 0)
    # the fast path's loss switched off (stock_loss): the model's own forward, as for SFT
    split = None if loss_module._stock[0] else decoder_and_head(model)
    if split is not None:
        body, head = split
        hidden = body(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        per_token = token_logprobs(hidden[:, :-1][selected], head, targets[selected])
    else:
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        logits = logits[:, -input_ids.shape[1] :][:, :-1][selected].float()
        per_token = -F.cross_entropy(logits, targets[selected], reduction="none")
    owners = owner[selected]
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=per_token.device)
    sums = sums.index_add(0, owners, per_token)
    counts = torch.bincount(owners, minlength=num_sequences)
    return sums, counts
