"""Guards around the loop: Ctrl-C saves and stops at a step boundary; NaN/inf is diagnosed."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


class Interrupt:
    """The first SIGINT asks the loop to stop after the current step (it then checkpoints);
    a second one exits at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            logger.info("\nSecond Ctrl-C: exiting now without saving.")
            os._exit(130)
        self.requested = True
        logger.info(
            "\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit "
            "at once)."
        )


@contextmanager
def catch_interrupt() -> Iterator[Interrupt]:
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt  # signals reach only the main thread; nothing to install
        return
    previous = signal.signal(signal.SIGINT, interrupt._handle)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def is_finite(value: float) -> bool:
    return math.isfinite(value)


def nan_diagnosis(
    step: int,
    lr: float,
    loss: float,
    grad_norm: float,
    origins: list[str],
    precision: str,
    learning_rate: float,
) -> str:
    """What went wrong at ``step``, which examples were in the batch, and the likely cause."""
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    value = loss if what == "loss" else grad_norm
    if precision == "fp16":
        cause = (
            "fp16 overflow (activations or gradients beyond fp16's range); use precision: bf16 "
            "or fp32, or lower learning_rate"
        )
    elif learning_rate >= 1e-2:
        cause = f"learning_rate {learning_rate:g} is too high for stable training; try 1e-4 to 1e-3"
    elif step <= 1:
        cause = (
            "the model or data already gives non-finite values before any update (check the "
            "base model's weights and these examples)"
        )
    else:
        cause = (
            "divergence: lower learning_rate, keep max_grad_norm > 0 (clipping), or lengthen the "
            "warm-up"
        )
    shown = ", ".join(origins[:8]) + (f" and {len(origins) - 8} more" if len(origins) > 8 else "")
    return (
        f"non-finite {what} ({value}) at step {step} (learning rate {lr:.3g}); the batch held "
        f"{shown or 'examples without recorded origins'}. Likely cause: {cause}. "
        f"The last good checkpoint is kept; or set on_nan: skip to skip such steps."
    )
