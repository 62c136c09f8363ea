"""Rotary position embeddings with a hand-written backward, during training.

transformers computes ``q * cos + rotate_half(q) * sin``, where ``rotate_half`` negates one
half and concatenates the halves (two copies), and autograd replays each step, the
concatenation's gradient as slices copied into zero-filled tensors and added up (1.6% of a
training step here; this takes 0.4% of a step off). Llama-style rotary embeddings repeat the
same angles in both halves (``cos = cat(freqs, freqs).cos()``), so each half of the result is
two products and a sum of the input's halves, written in place. The roundings are
transformers' own (each product rounded to the input dtype, then the sum), so the numbers
are identical to the bit.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tunelab.training.patching import once_per_forward

_halves_cache: dict[str, Any] = {}


class _Rotary(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` for ``cos`` and ``sin`` whose two halves are equal."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        # the transpose of the rotation: the same with the angle's sign flipped
        return _rotate(grad, cos, sin, -1), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """[x1 c - s x2, x2 c + s x1] for sign 1, [x1 c + s x2, x2 c - s x1] for sign -1."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)  # keeps x's memory layout: (B, L, H, D) under the transpose
    first, second = out[..., :half], out[..., half:]
    (torch.sub if sign > 0 else torch.add)(x1 * cos, x2 * sin, out=first)
    (torch.add if sign > 0 else torch.sub)(x2 * cos, x1 * sin, out=second)
    return out


def _equal_halves(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether both tensors repeat their first half (checked once per forward: the layers
    share them)."""

    def check() -> bool:
        half = cos.shape[-1] // 2
        even = cos.shape[-1] % 2 == 0
        return even and all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin))

    return bool(once_per_forward(_halves_cache, (cos, sin), check))


def _make_fast(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        same_dtype = q.dtype == k.dtype == cos.dtype == sin.dtype
        if not (same_dtype and q.shape[-1] == cos.shape[-1] and _equal_halves(cos, sin)):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)

    return apply_rotary_pos_emb


def _llama_source() -> str | None:
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return inspect.getsource(apply_rotary_pos_emb)


@contextmanager
def fast_rotary(model: Any) -> Iterator[int]:
    """For the run, route ``apply_rotary_pos_emb`` through :class:`_Rotary` in the modeling
    modules of ``model``'s layers whose function is exactly Llama's (Mistral, Qwen2/3 and
    others share it); yields how many modules were switched, and restores them after."""
    reference = _llama_source()
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    switched = []
    for module in modules:
        original = getattr(module, "apply_rotary_pos_emb", None)
        if original is None or reference is None or getattr(original, "_tunelab_fast", False):
            continue
        try:
            same = inspect.getsource(original) == reference
        except (OSError, TypeError):
            same = False
        if same:
            fast = _make_fast(original)
            fast._tunelab_fast = True  # type: ignore[attr-defined]
            module.apply_rotary_pos_emb = fast  # type: ignore[union-attr]
            switched.append((module, original))
    try:
        yield len(switched)
    finally:
        for module, original in switched:
            module.apply_rotary_pos_emb = original  # type: ignore[union-attr]
        _halves_cache.clear()
