"""Divergence that needs no long curve to see: a loss worse than guessing, a loss far above
where it started, a gradient norm that exploded. Shared by the training loop (a warning while
it runs and in the final summary) and ``tunelab doctor`` (from metrics.jsonl, even one line).

The uniform-guess level is ln(vocabulary size): the loss of a model that gives every token the
same probability. A trained or pretrained model is far below it; a loss above it means the
updates destroyed what the model knew, almost always because the learning rate is too high.
"""

from __future__ import annotations

import math
from typing import Any

UNIFORM_MARGIN = 1.0  # nats above ln(vocab): e (2.7) times less likely than a uniform guess
RISE_FACTOR = 2.0  # a loss twice where the run started (and a nat above it)
RISE_MIN_NATS = 1.0
START_STEPS = 3  # "where it started": the mean of the first logged losses
EXPLODED_GRAD_NORM = 1e4  # pre-clipping norm; adapters train at norms of about 0.1-10

# usual peak learning rates of AdamW per method (PEFT's and the papers' examples)
USUAL_LEARNING_RATES = {
    "lora": (1e-4, 5e-4),
    "dora": (1e-4, 5e-4),
    "qlora": (1e-4, 5e-4),
    "adalora": (1e-4, 1e-3),
    "ia3": (1e-3, 1e-2),
    "prompt_tuning": (3e-3, 3e-2),
    "prefix_tuning": (1e-3, 1e-2),
    "full": (1e-5, 5e-5),
}
METHOD_NAMES = {"full": "full fine-tuning", "ia3": "IA3", "adalora": "AdaLoRA"}


def _rate(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")  # 1e-4, as configs write it


def usual_range(method: str) -> str:
    """'LoRA usually trains at 1e-4 to 5e-4' for a method name."""
    low, high = USUAL_LEARNING_RATES.get(method, USUAL_LEARNING_RATES["lora"])
    name = METHOD_NAMES.get(method, method.replace("_", " ").replace("lora", "LoRA"))
    name = name[0].upper() + name[1:]
    return f"{name} usually trains at {_rate(low)} to {_rate(high)}"


def uniform_loss(vocab_size: int | None) -> float | None:
    return math.log(vocab_size) if vocab_size and vocab_size > 1 else None


def divergence_evidence(
    losses: list[tuple[int, float]],
    grad_norms: list[tuple[int, float]],
    vocab_size: int | None,
    rise: bool = True,
) -> str | None:
    """What shows divergence in the (step, loss) and (step, pre-clipping gradient norm) pairs
    logged so far, as one clause; None when nothing does. One pair is enough for the
    uniform-guess and gradient checks; the rise check (``rise``) compares with the first
    logged losses.
    """
    signs = []
    uniform = uniform_loss(vocab_size)
    if losses:
        step, last = losses[-1]
        head = [value for _, value in losses[:START_STEPS]]
        start = sum(head) / len(head)
        if uniform is not None and last > uniform + UNIFORM_MARGIN:
            signs.append(
                f"loss {last:.4g} at step {step} is above {uniform:.1f}, the loss of guessing "
                f"uniformly over the {vocab_size:,}-token vocabulary"
            )
        far_above = last > max(start * RISE_FACTOR, start + RISE_MIN_NATS)
        if rise and len(losses) > len(head) and far_above:
            signs.append(f"loss rose from {start:.4g} (first steps) to {last:.4g} (step {step})")
    exploded = [(s, v) for s, v in grad_norms if v >= EXPLODED_GRAD_NORM]
    if exploded:
        step, norm = max(exploded, key=lambda item: item[1])
        signs.append(f"gradient norm {norm:.3g} at step {step}")
    return "; ".join(signs) or None


def divergence_advice(learning_rate: Any, method: str) -> str:
    """Which learning rate was used, the usual range for the method, and what to do."""
    low, high = USUAL_LEARNING_RATES.get(method, USUAL_LEARNING_RATES["lora"])
    usual = usual_range(method)
    if isinstance(learning_rate, int | float) and learning_rate > high:
        return (
            f"learning_rate {learning_rate:g} is too high: {usual}. Lower it (e.g. --set "
            f"learning_rate={_rate(high)}) and train again; keep max_grad_norm at 1.0."
        )
    return (
        f"learning_rate is {learning_rate}; {usual}. Lower it, keep max_grad_norm at 1.0 and a "
        "warm-up (warmup_ratio 0.1); with precision fp16 switch to bf16 or fp32."
    )
