"""What a run carries from one step to the next, saved as each checkpoint's trainer_state.json.

The JSON keeps the names tunelab has always written, so checkpoints of older runs resume; a
file with a key this version does not know, or a value of the wrong kind, is refused with a
TunelabError naming it rather than half-read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError


@dataclass
class TrainState:
    """The run's counters: the data position (``step``) and what the results report."""

    step: int = 0  # optimizer steps done; an epoch's batch order is a function of (seed, epoch)
    tokens: int = 0  # tokens of the rows trained on, padding excluded
    loss_tokens: int = 0  # of those, the tokens the loss scored
    train_seconds: float = 0.0  # in the steps only (not evaluation, checkpoints or set-up)
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0  # early stopping's patience counter
    eval_loss_at_step: float | None = None  # set on an evaluated step: marks the best checkpoint
    skipped_steps: int = 0  # non-finite steps skipped under on_nan: skip
    processes: int = 1  # what a step was (api.check_resumable compares it on resume)
    reference_seconds: float | None = None  # preference: the reference model's one pass

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: Path) -> TrainState:
        """The state in a trainer_state.json's ``data``; ``source`` names the file in errors.

        Keys an older tunelab did not write take their defaults; ``step`` must be there."""
        fix = (
            f"It was not written by this version of tunelab or was edited. Delete {source.parent} "
            "to resume from the checkpoint before it, or start the run again with --overwrite."
        )
        if not isinstance(data, dict) or "step" not in data:
            raise TunelabError(f"{source} holds no training step ({str(data)[:80]!r}). {fix}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise TunelabError(f"{source} has keys tunelab does not know: {unknown}. {fix}")
        for key, value in data.items():
            kind = str(fields[key].type)
            ok = (value is None and "None" in kind) or (
                not isinstance(value, bool)
                and isinstance(value, int if kind == "int" else (int, float))
            )
            if not ok:
                raise TunelabError(f"{source}: {key} is {value!r}, not a number. {fix}")
        for key in ("step", "tokens", "loss_tokens", "evals_without_improvement", "skipped_steps"):
            if key in data and data[key] < 0:
                raise TunelabError(f"{source}: {key} is {data[key]}, below 0. {fix}")
        return cls(**data)


def track_best(state: TrainState, eval_loss: float, config: FineTuningConfig) -> bool:
    """Record an evaluation of this step; returns whether early stopping's patience has run out
    (``early_stopping_patience`` evaluations without an improvement of more than
    ``early_stopping_threshold``)."""
    best = state.best_eval_loss
    state.eval_loss_at_step = eval_loss
    if best is None or eval_loss < best - config.early_stopping_threshold:
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    state.best_eval_loss = eval_loss if best is None else min(best, eval_loss)
    patience = config.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience
