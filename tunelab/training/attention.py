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
heads by a reshape instead of a copy. When every bucket is that short, one function attends
them all, gathering straight from the token layout into the matmuls' layout and back.
Longer examples go to SDPA, whose memory does not grow with the square of the length.

Sliding windows (Mistral, Qwen2, Gemma 2/3...: each layer's call brings its ``sliding_window``)
are masked as transformers masks them: a query sees the keys less than ``sliding_window``
positions behind it, counted inside its own example. Attention soft-capping (Gemma 2's
``attn_logit_softcapping``: each layer's call brings its ``softcap``) is computed as Gemma 2's
eager attention computes it, ``cap * tanh(scaling * q.k / cap)`` before the mask, on the
matmul path only (SDPA has no soft-cap), so a soft-capped model attends every bucket with
matmuls whatever its length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.training.patching import once_per_forward

NAME = "tunelab_packed"

_layout_cache: dict[str, Any] = {}
_stacked_cache: dict[str, Any] = {}
_bias_cache: dict[tuple[int, int, torch.dtype, int | None], torch.Tensor] = {}

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
    return once_per_forward(
        _layout_cache, (position_ids,), lambda: packed_layout(position_ids.cpu())
    )


@dataclass
class StackedLayout:
    """Where each (token, head) row of the flattened (B*L*H, D) queries and (B*L*Hkv, D)
    keys/values sits when every bucket is laid out as :class:`_MatmulAttention` multiplies it:
    queries (S*Hkv, g*Lb, D), the g query heads of a key/value head stacked along the length,
    and keys/values (S*Hkv, Lb, D). ``*_take`` gathers rows into that layout (padding slots
    repeat their example's last token), ``*_back`` takes each real row back, ``query_padding``
    lists the padding rows of the queries, and ``buckets`` gives each bucket's (first query
    row, first key row, S*Hkv, longest length)."""

    query_take: torch.Tensor
    query_back: torch.Tensor
    query_padding: torch.Tensor
    key_take: torch.Tensor
    key_back: torch.Tensor
    buckets: list[tuple[int, int, int, int]]


def stacked_layout(position_ids: torch.Tensor, heads: int, kv_heads: int) -> StackedLayout:
    segments = segment_layout(position_ids)
    tokens = position_ids.numel()

    def rows_of(index: torch.Tensor, real: torch.Tensor, count: int) -> tuple[Any, Any]:
        # (S, Lb) token index -> rows ordered (sequence, head, position)
        per_head = torch.arange(count)[None, :, None]
        take = (index[:, None, :] * count + per_head).flatten()
        return take, real[:, None, :].expand(-1, count, -1).flatten()

    query_parts, key_parts, buckets = [], [], []
    query_first = key_first = 0
    for index, real in segments:
        index, real = index.cpu(), real.cpu()
        query_parts.append(rows_of(index, real, heads))
        key_parts.append(rows_of(index, real, kv_heads))
        sequences, longest = index.shape
        buckets.append((query_first, key_first, sequences * kv_heads, longest))
        query_first += sequences * heads * longest
        key_first += sequences * kv_heads * longest

    def gather_and_back(parts: list[tuple[Any, Any]], count: int) -> tuple[Any, Any, Any]:
        take = torch.cat([t for t, _ in parts])
        real = torch.cat([r for _, r in parts])
        back = torch.empty(tokens * count, dtype=torch.long)
        # every (token, head) is the real row of exactly one slot: a permutation
        back[take[real]] = torch.nonzero(real).flatten()
        return take, back, torch.nonzero(~real).flatten()

    device = position_ids.device
    query_take, query_back, query_padding = gather_and_back(query_parts, heads)
    key_take, key_back, _ = gather_and_back(key_parts, kv_heads)
    return StackedLayout(
        query_take.to(device),
        query_back.to(device),
        query_padding.to(device),
        key_take.to(device),
        key_back.to(device),
        buckets,
    )


def _cached_stacked_layout(position_ids: torch.Tensor, heads: int, kv_heads: int) -> StackedLayout:
    def build() -> StackedLayout:
        return stacked_layout(position_ids.cpu(), heads, kv_heads)

    return once_per_forward(_stacked_cache, (position_ids,), build, heads, kv_heads)


class _Regroup(torch.autograd.Function):
    """``x[forward_index]`` whose gradient is ``grad[backward_index]`` (zeroed where ``keep``
    is false): between the token order and the bucketed layout, both directions are plain
    gathers. Autograd's own backward of a gather is a scatter-add into zeros, serial on a CPU
    (it was 4% of a training step). Exact because padding slots get no gradient: their
    outputs are dropped and, being after every real token, no real query attends to them."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        forward_index: torch.Tensor,
        backward_index: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.backward_index, ctx.keep = backward_index, keep
        return x.index_select(0, forward_index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
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
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention interface: q (B, Hq, L, D), k/v (B, Hkv, L, D) ->
    (B, L, Hq, D); ``sliding_window``: keys at most this many positions back minus one;
    ``softcap``: attention logits soft-capped as Gemma 2's eager attention does. Falls back to
    plain SDPA (eager attention when soft-capped) when there is a cache or a mask
    (generation). Raises RuntimeError for soft-capping with attention dropout, which it does
    not compute (the family table keeps such a model on its own attention)."""
    if softcap and dropout:
        raise RuntimeError(
            "tunelab's packed attention does not soft-cap attention logits with attention "
            "dropout; training.families must keep this model on its own attention"
        )
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if position_ids is None or attention_mask is not None or key.shape[2] != length:
        causal = attention_mask is None and length > 1 and key.shape[2] == length
        if causal and sliding_window and sliding_window < length:
            attention_mask, causal = _window_mask(length, sliding_window, query.device), False
        if softcap:
            return _eager_softcapped(query, key, value, attention_mask, causal, scaling, softcap)
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal,
            enable_gqa=kv_heads != heads,
        )
        return output.transpose(1, 2).contiguous(), None
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    scaling = dim**-0.5 if scaling is None else scaling
    if not dropout and (query.device.type == "cpu" or softcap):
        stacked = _cached_stacked_layout(position_ids, heads, kv_heads)
        longest_bucket = max(longest for *_, longest in stacked.buckets)
        if longest_bucket <= MATMUL_MAX_LENGTH or softcap:
            # (B, H, L, D) -> (B*L*H, D) rows: a view, the projections' outputs are (B, L, H, D)
            rows = (t.transpose(1, 2).reshape(-1, dim) for t in (query, key, value))
            output = _StackedMatmulAttention.apply(*rows, stacked, scaling, sliding_window, softcap)
            return output.view(batch, length, heads, dim), None
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
        windowed = sliding_window is not None and sliding_window < longest
        if softcap or (longest <= MATMUL_MAX_LENGTH and not dropout and q.device.type == "cpu"):
            attended = _MatmulAttention.apply(q, k, v, scaling, sliding_window, softcap)
        else:
            attended = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=_window_mask(longest, sliding_window, q.device) if windowed else None,
                dropout_p=dropout,
                scale=scaling,
                is_causal=not windowed,
                enable_gqa=kv_heads != heads,
            ).transpose(1, 2)
        outputs.append(attended.reshape(sequences * longest, heads, dim))
    slots = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    output = _Regroup.apply(slots, layout.back, layout.take, layout.real)
    return output.view(batch, length, heads, dim), None


def _eager_softcapped(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scaling: float | None,
    softcap: float,
) -> tuple[torch.Tensor, None]:
    """Gemma 2's eager attention (soft-capped logits, fp32 softmax) of q (B, Hq, L, D) over
    k/v (B, Hkv, Lk, D), for the calls packed attention does not take (a cache, a mask);
    ``mask``: bool (True: attend) or additive; ``causal``: mask later keys. -> (B, L, Hq, D)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = _window_mask(query.shape[2], None, query.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(length, length) bool mask, True where query i may see key j: j <= i and, with a
    ``window``, j > i - window (transformers' sliding_window_overlay)."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = key <= query
    return allowed & (key > query - window) if window else allowed


def _causal_bias(
    length: int, groups: int, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """(groups * length, length) additive mask: 0 where :func:`_window_mask` allows, -inf
    elsewhere."""
    window = window if window and window < length else None
    key = (length, groups, dtype, window)
    if key not in _bias_cache:
        hidden = ~_window_mask(length, window, torch.device("cpu"))
        bias = torch.zeros(length, length, dtype=dtype).masked_fill(hidden, float("-inf"))
        _bias_cache[key] = bias.repeat(groups, 1)
    return _bias_cache[key]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when on (rotary embeddings in fp32 make q and k fp32 while v is bf16),
    else the input's: the backward runs outside autocast and must see the same."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    out: torch.Tensor | None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Causal attention (within ``window`` positions, when given; logits soft-capped at
    ``softcap``, when given) of stacked (S*Hkv, g*L, D) queries over (S*Hkv, L, D)
    keys/values; returns (output, attention weights in the compute dtype, and with a
    soft-cap the tanh of the scaled logits over the cap, which its backward needs)."""
    length = k.shape[1]
    groups = q.shape[1] // length
    bias = _causal_bias(length, groups, q.dtype, window).expand(q.shape[0], -1, -1)
    capped = None
    if softcap:
        # Gemma 2's order, one rounding per step as its eager code: scale, cap, then the mask
        capped = torch.bmm(q, k.transpose(1, 2)).mul_(scaling).div_(softcap).tanh_()
        scores = (capped * softcap).add_(bias)
    else:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling)
    # fp32 softmax then one rounding: as exact as it gets, and quicker on a CPU than the
    # reduced-precision softmax kernel
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(weights, v, out=out), weights, capped


def _attend_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    grad: torch.Tensor,
    scaling: float,
    out: tuple[torch.Tensor | None, ...] = (None, None, None),
    capped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_attend`'s output for q, k and v, in the same stacked layouts
    (``capped``: :func:`_attend`'s tanh of a soft-capped run)."""
    grad_q, grad_k, grad_v = out
    grad_v = torch.bmm(weights.transpose(1, 2), grad, out=grad_v)
    grad_weights = torch.bmm(grad, v.transpose(1, 2))
    # masked scores have zero weight, hence zero gradient: causality needs no extra step
    grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
    if capped is not None:  # through cap * tanh(x / cap): slope 1 - tanh^2
        grad_scores = grad_scores.mul_(1.0 - capped * capped)
    # the scores' scaling applied to the (length x dim) products, not the (length x length)
    # gradient: fewer elements
    grad_q = torch.bmm(grad_scores, k, out=grad_q).mul_(scaling)
    grad_k = torch.bmm(grad_scores.transpose(1, 2), q, out=grad_k).mul_(scaling)
    return grad_q, grad_k, grad_v


class _MatmulAttention(torch.autograd.Function):
    """Causal attention of (S, L, Hq, D) queries over (S, L, Hkv, D) keys/values with two
    batched matmuls; the query heads of one key/value head are stacked along the length, so
    grouped-query attention needs no copy of the keys. Softmax runs in fp32. (For one bucket,
    when a batch also holds buckets too long for matmuls; else
    :class:`_StackedMatmulAttention` takes every bucket at once.)

    Its own backward keeps only the attention weights in the compute dtype (autograd kept them
    twice, once as the fp32 softmax output: 6 bytes per score instead of 2) and runs the
    softmax gradient on them directly."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scaling: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        sequences, length, heads, dim = q.shape
        kv_heads = k.shape[2]
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        dtype = _compute_dtype(q)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        q_b = _stack_groups(q, kv_heads)
        k_b, v_b = (
            t.permute(0, 2, 1, 3).reshape(sequences * kv_heads, length, dim) for t in (k, v)
        )
        output, weights, capped = _attend(q_b, k_b, v_b, scaling, None, window, softcap)
        ctx.save_for_backward(q_b, k_b, v_b, weights, *([capped] if softcap else []))
        ctx.scaling, ctx.kv_heads = scaling, kv_heads
        return _unstack_groups(output, sequences, length)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q_b, k_b, v_b, weights, *capped = ctx.saved_tensors
        # the gradient can arrive in another dtype (fp32 weights under autocast)
        grad = grad.to(weights.dtype)
        sequences = grad.shape[0]
        kv_heads, length, dim = ctx.kv_heads, k_b.shape[1], k_b.shape[2]
        grad_q, grad_k, grad_v = _attend_backward(
            q_b, k_b, v_b, weights, _stack_groups(grad, kv_heads), ctx.scaling,
            capped=capped[0] if capped else None,
        )  # fmt: skip
        grad_k, grad_v = (
            t.view(sequences, kv_heads, length, dim).permute(0, 2, 1, 3) for t in (grad_k, grad_v)
        )
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        grad_q = _unstack_groups(grad_q, sequences, length)
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None, None, None


class _StackedMatmulAttention(torch.autograd.Function):
    """:class:`_MatmulAttention` over every bucket of a packed batch at once, from the token
    layout and back to it: one gather per input puts each bucket's rows where the batched
    matmuls read them (heads already stacked), and one gather takes the outputs back; the
    backward the same way round, each bucket writing its gradients into one buffer. Per
    bucket through autograd, each bucket's slice of the gathered inputs got a gradient the size
    of the whole batch, zero-filled and then summed over the buckets, and the heads were
    stacked and unstacked by copies: measured on 4 x 512 FOLDOC tokens, SmolLM2's 30 layers,
    forward and backward 415 -> 322 ms (2% of a training step), results identical to the bit."""

    @staticmethod
    def forward(
        ctx: Any,
        q_rows: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
        layout: StackedLayout,
        scaling: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        ctx.dtypes = (q_rows.dtype, k_rows.dtype, v_rows.dtype)
        dtype = _compute_dtype(q_rows)
        queries = q_rows.index_select(0, layout.query_take).to(dtype)
        keys, values = (t.index_select(0, layout.key_take).to(dtype) for t in (k_rows, v_rows))
        out = torch.empty_like(queries)
        saved: list[Any] = []  # each bucket's weights, and with a soft-cap its tanh after them
        for q, k, v, o in _bucket_views(layout, queries, keys, values, out):
            _, weights, capped = _attend(q, k, v, scaling, o, window, softcap)
            saved += [weights, capped] if softcap else [weights]
        ctx.save_for_backward(queries, keys, values, *saved)
        ctx.layout, ctx.scaling, ctx.softcap = layout, scaling, softcap
        return out.index_select(0, layout.query_back)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        queries, keys, values, *saved = ctx.saved_tensors
        layout = ctx.layout
        grad_out = grad.to(queries.dtype).index_select(0, layout.query_take)
        # padding rows' outputs were dropped: no gradient flows from them
        grad_out.index_fill_(0, layout.query_padding, 0)
        grads = [torch.empty_like(t) for t in (queries, keys, values)]
        views = _bucket_views(layout, queries, keys, values, grad_out, *grads)
        capped = saved[1::2] if ctx.softcap else [None] * len(saved)
        per_bucket = zip(saved[::2] if ctx.softcap else saved, capped, strict=True)
        for (q, k, v, g, *out), (weights, capped) in zip(views, per_bucket, strict=True):
            _attend_backward(q, k, v, weights, g, ctx.scaling, tuple(out), capped)
        backs = (layout.query_back, layout.key_back, layout.key_back)
        returned = zip(grads, backs, ctx.dtypes, strict=True)
        return (
            *(t.index_select(0, back).to(dtype) for t, back, dtype in returned),
            None,
            None,
            None,
            None,
        )


def _bucket_views(layout: StackedLayout, *tensors: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Each bucket's stacked views of query-shaped tensors (S*Hkv, g*Lb, D) and key-shaped
    ones (S*Hkv, Lb, D), told apart by their number of rows."""
    query_rows = layout.query_take.numel()
    groups = query_rows // layout.key_take.numel()
    for query_first, key_first, count, longest in layout.buckets:
        views = []
        for t in tensors:
            query_shaped = t.shape[0] == query_rows
            first, rows = (query_first, groups * longest) if query_shaped else (key_first, longest)
            views.append(t[first : first + count * rows].view(count, rows, t.shape[-1]))
        yield views


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
