"""Causal attention over packed rows without a dense mask.

transformers turns restarting ``position_ids`` into a block-diagonal (B, 1, L, L) mask, and
SDPA with an explicit mask is several times slower on a CPU than with ``is_causal`` (it was a
quarter of a training step). Here each packed example becomes its own sequence: examples of
similar length are gathered into one padded batch and attended with ``is_causal=True``.
Padding sits at the end of each sequence, so causal masking already hides it from real tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "tunelab_packed"

_layout_cache: dict[str, Any] = {"key": None, "value": None}


def segment_layout(position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Buckets of packed examples: for each, (gather index of shape (S, Lmax) into the
    flattened (B*L) tokens, mask of the real entries). Examples are bucketed by the next power
    of two of their length, so padding stays under half of any bucket."""
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
        buckets.setdefault(1 << (length - 1).bit_length(), []).append((start, length))
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


def _cached_layout(position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # every layer gets the same position_ids tensor: compute the layout once per forward
    key = (id(position_ids), position_ids.data_ptr(), tuple(position_ids.shape))
    if _layout_cache["key"] != key:
        _layout_cache["key"], _layout_cache["value"] = key, segment_layout(position_ids.cpu())
    return _layout_cache["value"]


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
    groups = heads // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if position_ids is None or attention_mask is not None or key.shape[2] != length:
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=attention_mask is None and length > 1 and key.shape[2] == length,
        )
        return output.transpose(1, 2).contiguous(), None
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    # (B, H, L, D) -> (B*L, H, D) so that one gather picks a whole example's tokens
    flat_q, flat_k, flat_v = (
        t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (query, key, value)
    )
    output = None
    for index, real in _cached_layout(position_ids):
        q, k, v = (t[index].transpose(1, 2) for t in (flat_q, flat_k, flat_v))
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True
        ).transpose(1, 2)
        if output is None:  # SDPA's dtype (bf16 under autocast even when q is fp32)
            output = attended.new_empty(batch * length, heads, dim)
        output = output.index_put((index[real],), attended[real])
    assert output is not None
    return output.view(batch, length, heads, dim), None


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
