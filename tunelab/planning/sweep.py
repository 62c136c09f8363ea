"""``tunelab sweep``: Optuna search over any config keys, each trial a normal tunelab run.

The search space lives in a top-level ``sweep:`` section of the run config (stripped before the
config is validated) or in a separate YAML file (``--space``)::

    sweep:
      trials: 20
      sampler: tpe          # tpe (default), random or grid
      pruner: median        # median (default), hyperband or none
      params:
        learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
        lora_r: {choices: [4, 8, 16]}
        warmup_ratio: {low: 0.0, high: 0.2}

Each trial trains in ``<output_dir>/trial-NNN`` and reports every evaluation (``eval_steps``)
to Optuna, which may prune it; the objective is the trial's final eval loss. The study is kept
in ``<output_dir>/sweep.db`` (SQLite) unless ``--storage`` names another Optuna RDB URL, so an
interrupted sweep resumes and several workers or machines can join one study.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from tunelab.config import FIELDS, FineTuningConfig, config_from_dict
from tunelab.errors import TunelabError, did_you_mean
from tunelab.yaml_numbers import load_yaml, yaml_error_line

logger = logging.getLogger(__name__)


SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
SPEC_KEYS = ("trials", "sampler", "pruner", "params", "seed", "study_name", "storage")


@dataclass
class SweepSpec:
    params: dict[str, dict[str, Any]]
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    study_name: str | None = None
    storage: str | None = None
    source: str = "sweep"


@dataclass
class SweepResult:
    study_name: str
    storage: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_config_path: Path | None = None
    plots: list[Path] = field(default_factory=list)


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise TunelabError(
            "tunelab sweep needs Optuna, which is not installed. Install it with "
            "pip install 'tunelab[sweep]' (or pip install optuna)."
        ) from None
    return optuna


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TunelabError(f"{path} does not exist. Pass a YAML file with the sweep settings.")
    try:
        values = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        where = yaml_error_line(exc)
        raise TunelabError(f"{path}{where}: not valid YAML ({exc}).") from None
    if not isinstance(values, dict):
        raise TunelabError(f"{path}: expected a mapping of 'key: value' lines.")
    return values


def load_sweep(config_path: str | Path, space_path: str | Path | None = None) -> tuple:
    """(base config, spec) from a run config with a ``sweep:`` section, or a run config plus
    a separate space file (whose keys may sit under ``sweep:`` or at the top)."""
    path = Path(config_path)
    values = _read_yaml(path)
    section = values.pop("sweep", None)
    source = f"{path} (sweep section)"
    if space_path is not None:
        space = _read_yaml(Path(space_path))
        section, source = space.get("sweep", space), str(space_path)
    if section is None:
        raise TunelabError(
            f"{path} has no 'sweep:' section and no --space file was given. Add a section like "
            "'sweep: {params: {learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}}}'."
        )
    base = config_from_dict(values, source=str(path), folder=path.resolve().parent)
    return base, parse_spec(section, source)


def parse_spec(section: Any, source: str = "sweep") -> SweepSpec:
    """Check the sweep section: every key known, every range well formed."""
    if not isinstance(section, dict):
        raise TunelabError(f"{source}: the sweep section must be a mapping, not {section!r}.")
    for key in section:
        if key not in SPEC_KEYS:
            raise TunelabError(
                f"{source}: unknown sweep key '{key}'.{did_you_mean(key, SPEC_KEYS)} Sweep keys: "
                f"{', '.join(SPEC_KEYS)}."
            )
    params = section.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise TunelabError(
            f"{source}: 'params' must map config keys to ranges, e.g. "
            "params: {learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}}."
        )
    for key, space in params.items():
        _check_param(key, space, source)
    spec = SweepSpec(
        params=params,
        source=source,
        **{k: section[k] for k in SPEC_KEYS if k in section and k != "params"},
    )
    if spec.sampler not in SAMPLERS:
        raise TunelabError(
            f"{source}: sampler {spec.sampler!r} is not known; use one of {', '.join(SAMPLERS)}."
        )
    if spec.pruner not in PRUNERS:
        raise TunelabError(
            f"{source}: pruner {spec.pruner!r} is not known; use one of {', '.join(PRUNERS)}."
        )
    if not isinstance(spec.trials, int) or spec.trials < 1:
        raise TunelabError(f"{source}: trials is {spec.trials!r}; it must be a whole number >= 1.")
    if spec.sampler == "grid":
        ranged = [k for k, s in params.items() if "choices" not in s]
        if ranged:
            raise TunelabError(
                f"{source}: the grid sampler needs 'choices' lists, but {', '.join(ranged)} "
                "has a low/high range. Give choices, or use sampler: tpe or random."
            )
    return spec


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_param(key: str, space: Any, source: str) -> None:
    if key not in FIELDS:
        raise TunelabError(
            f"{source}: params.{key} is not a config key.{did_you_mean(key, FIELDS)} Run "
            "'tunelab init' to see every key."
        )
    if key in ("output_dir", "dataset_path"):
        raise TunelabError(f"{source}: params.{key} cannot be searched; set it in the config.")
    if not isinstance(space, dict):
        raise TunelabError(
            f"{source}: params.{key} is {space!r}; expected {{choices: [...]}} or "
            "{low: ..., high: ..., log: true|false}."
        )
    if "choices" in space:
        if not isinstance(space["choices"], list) or not space["choices"]:
            raise TunelabError(f"{source}: params.{key}.choices must be a non-empty list.")
        return
    low, high = space.get("low"), space.get("high")
    if not (_is_number(low) and _is_number(high)) or not low < high:
        raise TunelabError(
            f"{source}: params.{key} needs numbers low < high (got low {low!r}, high {high!r}); "
            "or give choices: [...]."
        )
    if space.get("log") and low <= 0:
        raise TunelabError(f"{source}: params.{key} has log: true, so low must be > 0.")
    unknown = set(space) - {"low", "high", "log", "step"}
    if unknown:
        raise TunelabError(
            f"{source}: params.{key} has unknown field(s) {', '.join(sorted(unknown))}; "
            "use low, high, log, step or choices."
        )


def suggest(trial: Any, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The trial's values: ints stay ints when both bounds (and step) are ints."""
    values = {}
    for key, space in params.items():
        if "choices" in space:
            values[key] = trial.suggest_categorical(key, space["choices"])
        elif all(isinstance(space[k], int) for k in ("low", "high")) and isinstance(
            space.get("step", 1), int
        ):
            step, log = space.get("step", 1), space.get("log", False)
            values[key] = trial.suggest_int(key, space["low"], space["high"], step=step, log=log)
        else:
            step, log = space.get("step"), space.get("log", False)
            values[key] = trial.suggest_float(key, space["low"], space["high"], step=step, log=log)
    return values


def trial_config(base: FineTuningConfig, values: dict[str, Any], folder: Path) -> FineTuningConfig:
    return dataclasses.replace(base, **values, output_dir=str(folder))  # validated again


def _sampler(optuna: Any, spec: SweepSpec) -> Any:
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        grid = {k: s["choices"] for k, s in spec.params.items()}
        return optuna.samplers.GridSampler(grid, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def _pruner(optuna: Any, spec: SweepSpec, max_steps: int) -> Any:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_steps, 3))
    return optuna.pruners.NopPruner()


# the files a sweep writes beside its trial-NNN run folders
SWEEP_FILES = (
    "sweep.db", "best_config.yaml", "sweep_results.md", "optimization_history.png",
    "param_importance.png",
)  # fmt: skip


def default_storage(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'sweep.db'}"


def open_study(spec: SweepSpec, base: FineTuningConfig, storage: str | None = None) -> Any:
    optuna = import_optuna()
    storage = storage or spec.storage or default_storage(base.output_dir)
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    name = spec.study_name or Path(base.output_dir).name
    error: Exception | None = None
    for pause in (0.2, 0.5, 1.0, 2.0, None):
        try:
            return optuna.create_study(
                study_name=name,
                storage=storage,
                sampler=_sampler(optuna, spec),
                pruner=_pruner(optuna, spec, base.max_steps or 0),
                direction="minimize",
                load_if_exists=True,
            )
        except Exception as exc:  # noqa: BLE001 (bad URL, unknown dialect, missing driver)
            # workers starting together race to create the tables: try again briefly
            error = exc
            if pause is not None:
                time.sleep(pause)
    raise TunelabError(
        f"cannot open Optuna storage {storage!r}: {error}. Use an RDB URL such as "
        "sqlite:///sweep.db or postgresql://user:password@host/db."
    )


def run_sweep(
    base: FineTuningConfig,
    spec: SweepSpec,
    trials: int | None = None,
    storage: str | None = None,
) -> SweepResult:
    """Run trials until the study holds ``spec.trials`` finished ones (shared by all workers)
    or this worker ran ``trials``."""
    optuna = import_optuna()
    if not (base.eval_path or base.eval_split > 0):
        raise TunelabError(
            "a sweep ranks trials by eval loss, but the config has no eval data. Set eval_path, "
            "or eval_split (e.g. 0.1) to hold out part of the training data."
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(base.output_dir)
    from tunelab.ownership import check_output_files

    check_output_files(out, SWEEP_FILES, "sweep", announce=False)
    study = open_study(spec, base, storage)

    def objective(trial: Any) -> float:
        from tunelab.api import FineTuner

        values = suggest(trial, spec.params)
        folder = out / f"trial-{trial.number:03d}"
        try:
            config = trial_config(base, values, folder)
        except TunelabError as exc:  # e.g. lora_alpha and lora_r chosen apart
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("run_dir", str(folder))
        logger.info("trial %d: %s", trial.number, values)

        def on_eval(step: int, loss: float) -> None:
            if step == 0 or not math.isfinite(loss):
                return
            trial.report(loss, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at step {step} (eval loss {loss:.4f})")

        results = FineTuner(config).train(overwrite=True, on_eval=on_eval)
        if "eval_loss" not in results:
            raise TunelabError(f"trial {trial.number} produced no eval loss; see {folder}.")
        return float(results["eval_loss"])

    def finished(study: Any, _trial: Any) -> None:
        done = [t for t in study.trials if t.state.is_finished()]
        if len(done) >= spec.trials:
            study.stop()

    remaining = spec.trials - len([t for t in study.trials if t.state.is_finished()])
    if remaining > 0:
        from tunelab.files import disk_full_errors

        # a trial's own writes already say so; this catches the study database (SQLite)
        with disk_full_errors(out, "the sweep's study database"):
            study.optimize(
                objective, n_trials=min(trials or remaining, remaining), callbacks=[finished]
            )
    return summarise(study, base, spec, storage or spec.storage or default_storage(out))


def summarise(study: Any, base: FineTuningConfig, spec: SweepSpec, storage: str) -> SweepResult:
    """The results table, the plots and the best config written to the sweep folder."""
    out = Path(base.output_dir)
    result = SweepResult(study.study_name, storage)
    for t in study.trials:
        result.rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "eval_loss": t.value,
                "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                **t.params,
            }
        )
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        best = min(complete, key=lambda t: t.value)
        config = dataclasses.replace(base, **best.params, output_dir=str(out / "best"))
        result.best_config_path = out / "best_config.yaml"
        config.save(result.best_config_path)
    result.plots = write_plots(study, out)
    from tunelab.files import atomic_write_text

    atomic_write_text(out / "sweep_results.md", format_table(result) + "\n")
    from tunelab.ownership import record_files

    record_files(out, "sweep", [out / name for name in SWEEP_FILES if (out / name).is_file()])
    return result


def write_plots(study: Any, out: Path) -> list[Path]:
    """Optimisation history and parameter importance as PNGs (matplotlib, offline)."""
    from tunelab.figures import new_figure
    from tunelab.files import save_figure

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    written: list[Path] = []
    if not complete:
        return written
    out.mkdir(parents=True, exist_ok=True)
    fig = new_figure((6, 4))
    ax = fig.subplots()
    numbers = [t.number for t in complete]
    values = [t.value for t in complete]
    best = [min(values[: i + 1]) for i in range(len(values))]
    ax.scatter(numbers, values, label="eval loss")
    ax.step(numbers, best, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="eval loss", title="Optimisation history")
    ax.legend()
    fig.tight_layout()
    written.append(save_figure(fig, out / "optimization_history.png"))
    importances = parameter_importance(study)
    if importances:
        fig = new_figure((6, 0.6 * len(importances) + 1.5))
        ax = fig.subplots()
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="Parameter importance")
        fig.tight_layout()
        written.append(save_figure(fig, out / "param_importance.png"))
    return written


def parameter_importance(study: Any) -> dict[str, float]:
    """fANOVA importance of each searched key; empty with fewer than two distinct trials."""
    optuna = import_optuna()
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def format_table(result: SweepResult) -> str:
    fixed = ["trial", "state", "eval_loss", "last_step"]
    header = fixed + sorted({k for r in result.rows for k in r} - set(fixed))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    ordered = sorted(result.rows, key=lambda r: (r["eval_loss"] is None, r["eval_loss"] or 0))
    for row in ordered:
        lines.append("| " + " | ".join(cell(row.get(k)) for k in header) + " |")
    return "\n".join(lines)
