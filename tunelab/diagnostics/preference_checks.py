"""The failure modes of preference tuning, read from TRL-named metrics in metrics.jsonl.

- chosen log-probabilities falling along with the rejected ones ("likelihood displacement"):
  the margin grows because both answers become less likely, the good one too;
- reward accuracy stuck near 50%: the model does not tell the answers apart;
- margins exploding: the policy runs far from the reference (over-optimisation).
"""

from __future__ import annotations

import statistics
from typing import Any

from tunelab.diagnostics.findings import Finding

Record = dict[str, Any]

MIN_STEPS = 8  # fewer logged preference steps cannot tell a trend from noise
LOGP_FALL = 1.0  # nats per answer: a fall of the chosen log-probability this large is real
STUCK_BAND = (0.4, 0.6)  # accuracy still in this band over the last half of the run
EXPLODING_MARGIN = 10.0  # a mean reward margin this large: sigmoid(10) = 0.99995, no signal left


def _series(train: list[Record], key: str) -> list[float]:
    return [float(r[key]) for r in train if isinstance(r.get(key), int | float)]


def _ends(values: list[float]) -> tuple[float, float]:
    window = max(1, len(values) // 5)
    return statistics.fmean(values[:window]), statistics.fmean(values[-window:])


def check_chosen_falling(train: list[Record], config: Record) -> list[Finding]:
    chosen, rejected = _series(train, "logps/chosen"), _series(train, "logps/rejected")
    if len(chosen) < MIN_STEPS or len(rejected) < MIN_STEPS:
        return []
    chosen_start, chosen_end = _ends(chosen)
    rejected_start, rejected_end = _ends(rejected)
    if not (chosen_start - chosen_end > LOGP_FALL and rejected_end < rejected_start):
        return []
    return [
        Finding(
            "preference_chosen_falling",
            "warning",
            "Chosen answers are becoming less likely, along with the rejected ones",
            f"logps/chosen fell from {chosen_start:.2f} to {chosen_end:.2f} and logps/rejected "
            f"from {rejected_start:.2f} to {rejected_end:.2f}: the margin grows by pushing both "
            "answers down, which also pushes probability to answers in neither.",
            "Lower learning_rate (now "
            f"{config.get('learning_rate')}), train fewer steps, run SFT on the chosen answers "
            "first, or keep the chosen answers likely with objective: orpo or simpo with "
            "cpo_alpha > 0.",
        )
    ]


def check_accuracy_stuck(train: list[Record], config: Record) -> list[Finding]:
    accuracy = _series(train, "rewards/accuracies")
    if len(accuracy) < MIN_STEPS:
        return []
    last_half = accuracy[len(accuracy) // 2 :]
    late = statistics.fmean(last_half)
    low, high = STUCK_BAND
    if not low <= late <= high:
        return []
    return [
        Finding(
            "preference_accuracy_stuck",
            "warning",
            "Reward accuracy is stuck near 50%",
            f"rewards/accuracies averaged {late:.2f} over the last {len(last_half)} "
            "logged steps: the model prefers the chosen answer no more often than chance.",
            "Raise learning_rate (now "
            f"{config.get('learning_rate')}) or beta (now {config.get('beta')}); check that "
            "chosen and rejected are not swapped or near-identical (tunelab data inspect), and "
            "that the rejected answers are really worse.",
        )
    ]


def check_margins_exploding(train: list[Record], config: Record) -> list[Finding]:
    margins = _series(train, "rewards/margins")
    if len(margins) < MIN_STEPS:
        return []
    _, end = _ends(margins)
    if end < EXPLODING_MARGIN:
        return []
    return [
        Finding(
            "preference_margins_exploding",
            "warning",
            "Reward margins are exploding",
            f"rewards/margins reached {end:.1f} (mean of the last logged steps): the loss has "
            "nothing left to learn from these pairs and the model drifts far from its reference.",
            "Lower learning_rate or train fewer steps; use objective: ipo (its margin has a "
            "target) or label_smoothing 0.1 (dpo); watch the held-out rewards/accuracies.",
        )
    ]


def preference_findings(train: list[Record], config: Record) -> list[Finding]:
    """Every preference check (none apply to an SFT run: its log has no rewards)."""
    return (
        check_chosen_falling(train, config)
        + check_accuracy_stuck(train, config)
        + check_margins_exploding(train, config)
    )
