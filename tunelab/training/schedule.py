"""Learning-rate schedules: warm-up, then linear, cosine or constant."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """Warm-up length in steps: ``warmup_steps`` when given, else a share of the run."""
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """The multiplier of the peak rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)  # never 0, so the first step already learns
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # linear
