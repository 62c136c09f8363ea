"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

The noise is ``alpha / sqrt(L * d)`` times uniform(-1, 1) per element, ``L`` the row's length
and ``d`` the embedding width, as in transformers' and TRL's NEFTune hook (with packing, ``L``
is the packed row's length). It is added only while the embedding module is in training mode,
so evaluation and generation see the clean embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _noisy(module: torch.nn.Module, inputs: Any, output: torch.Tensor, alpha: float) -> Any:
    if not module.training:
        return output
    scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
    return output + torch.empty_like(output).uniform_(-scale, scale)


@contextmanager
def neftune(model: Any, alpha: float | None) -> Iterator[None]:
    """Add NEFTune noise of scale ``alpha`` to ``model``'s input embeddings inside the block
    (nothing when ``alpha`` is None)."""
    if not alpha:
        yield
        return
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda m, i, o: _noisy(m, i, o, alpha))
    try:
        yield
    finally:
        handle.remove()
