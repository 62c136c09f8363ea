"""Guards around the loop: Ctrl-C, or a stop request written into the run folder (``tunelab
ui``'s Stop on a run it did not start), saves and stops at a step boundary; NaN/inf is
diagnosed."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.files import atomic_write_json
from tunelab.run_folder import STOP_REQUEST

logger = logging.getLogger(__name__)
STOP_REQUEST_FORMAT = "tunelab stop request"


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


def request_stop(run_dir: str | Path, by: str = "tunelab ui") -> Path:
    """Ask the run training in ``run_dir`` (whichever process it is, wherever it was started)
    to save a checkpoint and stop at its next step boundary, as Ctrl-C does.

    A file rather than a signal: the asking process never signals a pid it cannot prove is
    that run's, and it works on every platform. A request older than a training process is
    ignored by it (see :func:`stop_requested`), so a leftover one never stops a later run.
    Returns the request file's path."""
    path = Path(run_dir) / STOP_REQUEST
    return atomic_write_json(
        path, {"format": STOP_REQUEST_FORMAT, "requested_at": time.time(), "by": by}
    )


def _read_request(run_dir: Path) -> dict[str, Any] | None:
    """The stop request in ``run_dir`` if it is one tunelab wrote; None otherwise."""
    try:
        request = json.loads((run_dir / STOP_REQUEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none, or half-written by a non-atomic writer: look again next step
    if not isinstance(request, dict) or request.get("format") != STOP_REQUEST_FORMAT:
        return None
    requested_at = request.get("requested_at")
    if isinstance(requested_at, bool) or not isinstance(requested_at, (int, float)):
        return None
    return request


def stop_requested(run_dir: str | Path, since: float) -> str | None:
    """Who asked the run in ``run_dir`` to stop (e.g. "tunelab ui"), when the request was
    written at or after ``since`` (seconds since the epoch: when this training began); else
    None. One failed ``open`` when there is no request, so it is cheap at every step."""
    request = _read_request(Path(run_dir))
    if request is None or request["requested_at"] < since:
        return None
    return str(request.get("by") or "a stop request")


def clear_stop_request(run_dir: str | Path) -> None:
    """Remove the run's stop request (honoured, or left over), if tunelab wrote it."""
    if _read_request(Path(run_dir)) is not None:
        (Path(run_dir) / STOP_REQUEST).unlink(missing_ok=True)


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
