"""``tunelab pilot``: a short learning-curve pilot before the long run.

Trains the run's recipe on growing shares of its training data (default 25%, 50%, 100%, a
seeded sample, each share containing the smaller ones) for the same small number of optimizer
steps, evaluating the held-out loss along the way, and answers two questions from the curves:

- *more data?* At a fixed budget, did the held-out loss still fall from half the data to all
  of it? If so, more data of the same kind is likely to pay.
- *more steps?* On all the data, did the held-out loss still fall over the last half of the
  budget? If so, more steps are likely to pay; if it rose, the run is already overfitting.

A fall counts when it is at least ``threshold`` (default 1%) of the loss: smaller moves are
within what a different seed would change. The pilot is a hint for where to spend hours, not a
forecast of the final loss.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.files import json_text


@dataclass
class PilotRun:
    fraction: float
    examples: int
    curve: list[tuple[int, float]]  # (optimizer step, held-out loss)

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]


@dataclass
class PilotResult:
    steps: int
    runs: list[PilotRun]
    advice: list[str] = field(default_factory=list)
    data_gain: float | None = None  # relative fall of the final loss, half -> all the data
    step_gain: float | None = None  # relative fall over the last half of the full-data run

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "runs": [dataclasses.asdict(run) for run in self.runs],
            "data_gain": self.data_gain,
            "step_gain": self.step_gain,
            "advice": self.advice,
        }


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted({float(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise TunelabError(
            f"--fractions {text!r}: give shares of the data separated by commas, e.g. 0.25,0.5,1"
        ) from None
    if len(values) < 2 or not all(0 < v <= 1 for v in values) or values[-1] != 1:
        raise TunelabError(
            f"--fractions {text!r}: give at least two shares between 0 and 1, the last 1 "
            "(all the data), e.g. 0.25,0.5,1."
        )
    return values


def nested_subsets(count: int, fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """Indices of each share of ``count`` examples, each share holding the smaller ones, so
    that a difference between shares is the added data and not a different draw. Raises
    TunelabError when two shares round to as many examples."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    sizes = [max(1, round(count * f)) for f in fractions]
    for i in range(1, len(sizes)):
        smaller, larger, size = fractions[i - 1], fractions[i], sizes[i]
        if sizes[i - 1] == size:
            # two runs on the same examples: their difference would read as "more data
            # does not pay"
            raise TunelabError(
                f"tunelab pilot: shares {smaller:g} and {larger:g} of {count} training "
                f"examples both hold {size}, so they cannot show what more data changes. Add "
                "data, or give fewer, wider --fractions (e.g. 0.5,1)."
            )
    return [sorted(order[:size]) for size in sizes]


def advise(runs: list[PilotRun], steps: int, threshold: float = 0.01) -> PilotResult:
    """The two answers (more data? more steps?) from the pilot's curves."""
    result = PilotResult(steps, runs)
    full = runs[-1]
    half = min(runs[:-1], key=lambda run: abs(run.fraction - full.fraction / 2))
    result.data_gain = (half.final_loss - full.final_loss) / half.final_loss
    share = f"{half.fraction * 100:.0f}% to {full.fraction * 100:.0f}%"
    change = (
        f"held-out loss {half.final_loss:.3f} -> {full.final_loss:.3f} "
        f"({-result.data_gain * 100:+.1f}%) going from {share} of the data at {steps} steps"
    )
    if result.data_gain >= threshold:
        result.advice.append(f"More data is likely to pay: {change}.")
    else:
        result.advice.append(
            f"More data of this kind is unlikely to pay at this budget: {change} "
            f"(less than {threshold * 100:.0f}%)."
        )
    middle = [loss for step, loss in full.curve if step <= steps / 2]
    if middle:
        before = middle[-1]
        result.step_gain = (before - full.final_loss) / before
        trend = (
            f"on all the data, held-out loss {before:.3f} at step "
            f"{max(s for s, _ in full.curve if s <= steps / 2)} -> {full.final_loss:.3f} at "
            f"step {full.curve[-1][0]} ({-result.step_gain * 100:+.1f}%)"
        )
        if result.step_gain >= threshold:
            result.advice.append(f"More steps are likely to pay: {trend}.")
        elif result.step_gain <= -threshold:
            result.advice.append(
                f"More steps will not pay: {trend}, already overfitting; lower the learning "
                "rate or add data instead."
            )
        else:
            result.advice.append(f"More steps are unlikely to pay: {trend}; the curve is flat.")
    return result


def run_pilot(
    config: Any,
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0),
    steps: int = 30,
    evaluations: int = 4,
    out_dir: str | Path | None = None,
    threshold: float = 0.01,
    progress: Any = print,
) -> PilotResult:
    """Train ``config``'s recipe on each share of its data for ``steps`` optimizer steps,
    evaluating ``evaluations`` times, and write pilot.json into ``out_dir`` (default:
    ``<output_dir>/pilot``). Needs held-out data (eval_path or eval_split)."""
    from tunelab.api import FineTuner
    from tunelab.data.prepare import prepare_examples

    if steps < 2:
        raise TunelabError(f"--steps must be at least 2 (got {steps}).")
    if config.objective != "sft":
        # the pilot compares held-out next-token losses of SFT data; a preference file read
        # as SFT data failed with a schema error that told the user to rename its columns
        raise TunelabError(
            f"tunelab pilot runs objective sft only; this config has objective "
            f"{config.objective}. Pilot the SFT stage's config, or compare preference runs "
            "with tunelab runs and tunelab eval."
        )
    # said once the settings are checked: a refused run does not announce itself first
    shares = ",".join(f"{f:g}" for f in fractions)
    progress(f"Pilot: {steps} steps on each share of the data ({shares}).")
    folder = Path(out_dir or Path(config.output_dir) / "pilot")
    prepared = prepare_examples(config)
    if not prepared.eval:
        raise TunelabError(
            "tunelab pilot compares held-out losses: set eval_path (or eval_split, e.g. 0.1) "
            "in the config."
        )
    subsets = nested_subsets(len(prepared.train), fractions, config.seed)
    runs = []
    for fraction, indices in zip(fractions, subsets, strict=True):
        run_config = dataclasses.replace(
            config,
            output_dir=str(folder / f"data-{fraction * 100:g}pct"),
            max_steps=steps,
            eval_steps=max(steps // evaluations, 1),
            save_steps=None,
        )
        tuner = FineTuner(run_config)
        tuner.prepared = dataclasses.replace(prepared, train=[prepared.train[i] for i in indices])
        seen: dict[int, float] = {}  # the loop evaluates at the end too: one value per step
        tuner.train(
            tuner.rows(tuner.prepared.train), tuner.eval_rows(), overwrite=True,
            on_eval=seen.__setitem__,
        )  # fmt: skip
        curve = sorted((int(step), float(loss)) for step, loss in seen.items())
        runs.append(PilotRun(fraction, len(indices), curve))
        progress(
            f"  {fraction * 100:5.1f}% of the data ({len(indices)} examples): held-out loss "
            + " -> ".join(f"{loss:.3f}" for _, loss in curve)
        )
    result = advise(runs, steps, threshold)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pilot.json").write_text(json_text(result.to_json(), indent=1) + "\n")
    return result
