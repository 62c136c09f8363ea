"""Causal attention over packed rows without a dense mask.

transformers turns restarting ``position_ids`` into a block-diagonal (B, 1, L, L) mask, and
SDPA with an explicit mask is several times slower on a CPU than with ``is_causal`` (it was a
quarter of a training step). Here each packed example becomes its own sequence: examples of
similar length are gathered into one padded batch and attended with ``is_causal=True``.
Padding sits at the end of each sequence, so causal masking already hides it from real tokens.

Examples up to MATMUL_MAX_LENGTH tokens are attended with plain batched matmuls, an additive
causal mask and a hand-written backward that keeps only the bf16 attention weights: CPU SDPA
kernels pay a fixed cost per (sequence, head) that dominates short sequences. Measured on this
machine, forward and backward of 2,048 tokens (4 x 512 rows, SmolLM2's 9 query and 3 key/value
heads): 160-token sequences 47 ms with SDPA, 17 ms with matmuls; 256 tokens 38 vs 22 ms;
384 tokens 56 vs 40 ms; 512 tokens 63 vs 55 ms. Grouped-query heads share their key/value
heads by a reshape instead of a copy. Longer examples go to SDPA, whose memory does not grow
with the square of the length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

NAME = "tunelab_packed"

_layout_cache: dict[str, Any] = {"key": None, "value": None}
_bias_cache: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

# longest bucket attended with matmuls; longer ones go to SDPA (measured above; the matmul
# path keeps L x L bf16 weights per head for the backward, SDPA keeps none)
MATMUL_MAX_LENGTH = 512
BUCKET_STEP = 32


def bucket_of(length: int) -> int:
    """The padded length an example of ``length`` tokens is attended at: the next power of two
    up to BUCKET_STEP, then the next multiple of it. (Powers of two all the way padded a
    (64, 128] bucket to 113 tokens on average for FOLDOC entries; attention cost grows with
    the square of the padded length, and a bucket more costs ~0.3 ms a layer.)"""
    if length <= BUCKET_STEP:
        return 1 << (length - 1).bit_length()
    return -(-length // BUCKET_STEP) * BUCKET_STEP


def segment_layout(position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Buckets of packed examples: for each, (gather index of shape (S, Lmax) into the
    flattened (B*L) tokens, mask of the real entries). Examples are bucketed by
    :func:`bucket_of` their length, so little of any bucket is padding."""
    rows, width = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    segments: list[tuple[int, int]] = []  # (flat start, length)
    for r in range(rows):
        begin = torch.nonzero(starts[r]).flatten().tolist() + [width]
        segments += [
            (r * width + a, b - a) for a, b in zip(begin[:-1], begin[1:], strict=False) if b > a
        ]
    buckets: dict[int, list[tuple[int, int]]] = {}
    for start, length in segments:
        buckets.setdefault(bucket_of(length), []).append((start, length))
    layout = []
    for _, members in sorted(buckets.items()):
        longest = max(length for _, length in members)
        offsets = torch.arange(longest)
        starts_t = torch.tensor([s for s, _ in members])
        lengths = torch.tensor([n for _, n in members])
        real = offsets[None, :] < lengths[:, None]
        # padded entries point at the example's own last token: valid, and never attended to
        index = starts_t[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)
        layout.append((index.to(position_ids.device), real.to(position_ids.device)))
    return layout


@dataclass
class PackedLayout:
    """Where each token of the flattened (B*L) batch sits in the bucketed layout.

    The buckets, stacked, are ``rows`` token slots: ``take`` (rows,) names the token each slot
    holds (padding slots repeat their example's last token), ``back`` (B*L,) names each
    token's real slot, ``real`` (rows,) marks the real slots, and ``buckets`` gives each
    bucket's (first slot, sequences, longest length).
    """

    take: torch.Tensor
    back: torch.Tensor
    real: torch.Tensor
    buckets: list[tuple[int, int, int]]


def packed_layout(position_ids: torch.Tensor) -> PackedLayout:
    segments = segment_layout(position_ids)
    take = torch.cat([index.flatten() for index, _ in segments])
    real = torch.cat([mask.flatten() for _, mask in segments])
    back = torch.empty(position_ids.numel(), dtype=torch.long, device=take.device)
    # every token is the real slot of exactly one example, so this is a permutation
    back[take[real]] = torch.nonzero(real).flatten()
    buckets, first = [], 0
    for index, _ in segments:
        buckets.append((first, index.shape[0], index.shape[1]))
        first += index.numel()
    return PackedLayout(take, back, real, buckets)


def _cached_layout(position_ids: torch.Tensor) -> PackedLayout:
    # every layer gets the same position_ids tensor: compute the layout once per forward
    key = (id(position_ids), position_ids.data_ptr(), tuple(position_ids.shape))
    if _layout_cache["key"] != key:
        _layout_cache["key"], _layout_cache["value"] = key, packed_layout(position_ids.cpu())
    return _layout_cache["value"]


class _Regroup(torch.autograd.Function):
    """``x[forward_index]`` whose gradient is ``grad[backward_index]`` (zeroed where ``keep``
    is false): between the token order and the bucketed layout, both directions are plain
    gathers. Autograd's own backward of a gather is a scatter-add into zeros, serial on a CPU
    (it was 4% of a training step). Exact because padding slots get no gradient: their
    outputs are dropped and, being after every real token, no real query attends to them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        forward_index: torch.Tensor,
        backward_index: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.backward_index, ctx.keep = backward_index, keep
        return x.index_select(0, forward_index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        out = grad.index_select(0, ctx.backward_index)
        if ctx.keep is not None:
            # a multiply: a bool mask's masked_fill is an unvectorised loop on a CPU (5x slower)
            out.mul_(ctx.keep.view(-1, *([1] * (out.dim() - 1))).to(out.dtype))
        return out, None, None, None


def packed_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention interface: q (B, Hq, L, D), k/v (B, Hkv, L, D) ->
    (B, L, Hq, D). Falls back to plain SDPA when there is a cache or a mask (generation)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if position_ids is None or attention_mask is not None or key.shape[2] != length:
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=attention_mask is None and length > 1 and key.shape[2] == length,
            enable_gqa=kv_heads != heads,
        )
        return output.transpose(1, 2).contiguous(), None
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    scaling = dim**-0.5 if scaling is None else scaling
    # (B, H, L, D) -> (B*L, H, D) so that one gather picks a whole example's tokens (a view:
    # the projections' outputs are laid out (B, L, H, D) in memory)
    flat_q, flat_k, flat_v = (
        t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)
    )
    layout = _cached_layout(position_ids)
    q_slots, k_slots, v_slots = (
        _Regroup.apply(t, layout.take, layout.back, None) for t in (flat_q, flat_k, flat_v)
    )
    outputs = []
    for first, sequences, longest in layout.buckets:
        q, k, v = (
            t[first : first + sequences * longest].view(sequences, longest, t.shape[1], dim)
            for t in (q_slots, k_slots, v_slots)
        )
        # the fixed per-sequence cost is a CPU kernel's: on a GPU, SDPA's fused kernels win
        if longest <= MATMUL_MAX_LENGTH and not dropout and q.device.type == "cpu":
            attended = _MatmulAttention.apply(q, k, v, scaling)
        else:
            attended = F.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)),
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
                enable_gqa=kv_heads != heads,
            ).transpose(1, 2)
        outputs.append(attended.reshape(sequences * longest, heads, dim))
    slots = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    output = _Regroup.apply(slots, layout.back, layout.take, layout.real)
    return output.view(batch, length, heads, dim), None


def _causal_bias(length: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(groups * length, length) additive mask: 0 on and below the diagonal, -inf above."""
    key = (length, groups, dtype)
    if key not in _bias_cache:
        above = torch.ones(length, length, dtype=torch.bool).triu(1)
        bias = torch.zeros(length, length, dtype=dtype).masked_fill(above, float("-inf"))
        _bias_cache[key] = bias.repeat(groups, 1)
    return _bias_cache[key]


class _MatmulAttention(torch.autograd.Function):
    """Causal attention of (S, L, Hq, D) queries over (S, L, Hkv, D) keys/values with two
    batched matmuls; the query heads of one key/value head are stacked along the length, so
    grouped-query attention needs no copy of the keys. Softmax runs in fp32.

    Its own backward keeps only the attention weights in the compute dtype (autograd kept them
    twice, once as the fp32 softmax output: 6 bytes per score instead of 2) and runs the
    softmax gradient on them directly."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        sequences, length, heads, dim = q.shape
        kv_heads = k.shape[2]
        groups = heads // kv_heads
        # one compute dtype: autocast's when on (rotary embeddings in fp32 make q and k fp32
        # while v is bf16); the backward runs outside autocast and must see the same
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        device = q.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        q, k, v = (t.to(dtype) for t in (q, k, v))
        q_b = _stack_groups(q, kv_heads)
        k_b, v_b = (
            t.permute(0, 2, 1, 3).reshape(sequences * kv_heads, length, dim) for t in (k, v)
        )
        bias = _causal_bias(length, groups, q.dtype).expand(sequences * kv_heads, -1, -1)
        scores = torch.baddbmm(bias, q_b, k_b.transpose(1, 2), alpha=scaling)
        # fp32 softmax then one rounding: as exact as it gets, and quicker on a CPU than the
        # reduced-precision softmax kernel
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        ctx.save_for_backward(q_b, k_b, v_b, weights)
        ctx.scaling, ctx.kv_heads = scaling, kv_heads
        return _unstack_groups(torch.bmm(weights, v_b), sequences, length)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q_b, k_b, v_b, weights = ctx.saved_tensors
        # the gradient can arrive in another dtype (fp32 weights under autocast)
        grad = grad.to(weights.dtype)
        sequences = grad.shape[0]
        kv_heads, length, dim = ctx.kv_heads, k_b.shape[1], k_b.shape[2]
        grad_b = _stack_groups(grad, kv_heads)
        grad_v = torch.bmm(weights.transpose(1, 2), grad_b)
        grad_weights = torch.bmm(grad_b, v_b.transpose(1, 2))
        # masked scores have zero weight, hence zero gradient: causality needs no extra step
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        # the scores' scaling applied to the (length x dim) products, not the (length x length)
        # gradient: fewer elements
        grad_q = _unstack_groups(torch.bmm(grad_scores, k_b).mul_(ctx.scaling), sequences, length)
        grad_k, grad_v = (
            t.view(sequences, kv_heads, length, dim).permute(0, 2, 1, 3)
            for t in (torch.bmm(grad_scores.transpose(1, 2), q_b).mul_(ctx.scaling), grad_v)
        )
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None


def _stack_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(S, L, Hkv*g, D) -> (S*Hkv, g*L, D): query head h uses key head h // g."""
    sequences, length, heads, dim = x.shape
    groups = heads // kv_heads
    x = x.view(sequences, length, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
    return x.reshape(sequences * kv_heads, groups * length, dim)


def _unstack_groups(x: torch.Tensor, sequences: int, length: int) -> torch.Tensor:
    """(S*Hkv, g*L, D) -> (S, L, Hkv*g, D), the inverse of :func:`_stack_groups`."""
    stacked, dim = x.shape[1], x.shape[2]
    kv_heads, groups = x.shape[0] // sequences, stacked // length
    x = x.view(sequences, kv_heads, groups, length, dim).permute(0, 3, 1, 2, 4)
    return x.reshape(sequences, length, kv_heads * groups, dim)


def register() -> None:
    """Make ``attn_implementation="tunelab_packed"`` known to transformers (no mask built)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, lambda *args, **kwargs: None)


def use_packed_attention(model: Any) -> bool:
    """Switch a loaded model to packed attention where its attention takes the standard
    interface (Llama-family models); returns whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
