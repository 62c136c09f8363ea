"""``tunelab estimate`` and ``tunelab sweep``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from tunelab.planning.memory import TrainingSetup


def estimate_keys() -> list[str]:
    """The run config keys an estimate reads: TrainingSetup's fields that are config keys."""
    from tunelab.config import FIELDS

    return [f.name for f in dataclasses.fields(TrainingSetup) if f.name in FIELDS]


def setup_values(config: Any) -> dict[str, Any]:
    """The TrainingSetup values a run config fixes (what ``tunelab estimate CONFIG`` uses)."""
    values = {key: getattr(config, key) for key in estimate_keys()}
    values["target_modules"] = list(values["target_modules"])
    if values["precision"] == "auto":  # the estimate's own default: bf16, the usual GPU case
        del values["precision"]
    return values


def cmd_estimate(args: argparse.Namespace) -> int:
    from tunelab.config import config_from_dict, load_config
    from tunelab.errors import TunelabError
    from tunelab.planning.architecture import ESTIMATE_METHODS
    from tunelab.planning.estimate import format_estimate, run_estimate

    # the options are the run config's keys: given ones override the config (or the defaults)
    given = {key: getattr(args, key) for key in estimate_keys() if getattr(args, key) is not None}
    if args.config:
        config = load_config(args.config, args.set)
        config = dataclasses.replace(config, **given) if given else config
    else:
        config = config_from_dict(given, source="tunelab estimate", overrides=args.set)
    if config.method not in ESTIMATE_METHODS:
        raise TunelabError(
            f"{args.config or 'tunelab estimate'}: method {config.method!r} has no estimate; "
            f"estimates cover {', '.join(ESTIMATE_METHODS)}."
        )
    values = setup_values(config)
    values.update(devices=args.devices, loss_fraction=args.loss_fraction)
    model = args.model or (config.model_name if args.config else None)
    from tunelab.config import DEFAULT_MODEL

    estimate = run_estimate(
        model or DEFAULT_MODEL,
        TrainingSetup(**values),
        config_json=args.config_json,
        target=args.gpu,
        utilization=args.utilization,
        epoch_tokens=args.epoch_tokens,
        context=args.context,
    )
    print(json.dumps(estimate.as_dict(), indent=2) if args.json else format_estimate(estimate))
    return 0


def add_config_options(
    parser: argparse.ArgumentParser, keys: list[str], choices: dict[str, tuple[Any, ...]]
) -> None:
    """One ``--key-name`` option per config key, typed, documented and limited to the choices
    the schema gives (narrowed by ``choices``); an option left out is None."""
    from tunelab.config import FIELDS, _default, choices_of, type_text, yaml_text

    for key in keys:
        hint = type_text(key)
        allowed = choices.get(key) or choices_of(key)
        options: dict[str, Any] = {"default": None, "dest": key}
        if hint == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif hint.startswith("list of"):
            options["nargs"] = "+"
        else:
            options["type"] = {"int": int, "float": float}.get(hint.split("|")[0], str)
            if allowed:
                options["type"] = type(allowed[0])
                options["choices"] = allowed
        default = yaml_text(_default(key))
        doc = FIELDS[key].metadata["help"].replace("%", "%%")  # argparse formats help with %
        options["help"] = f"{doc} (config key {key}; default: {default})"
        parser.add_argument("--" + key.replace("_", "-"), **options)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunelab.planning.sweep import format_table, load_sweep, run_sweep

    base, spec = load_sweep(args.config, args.space)
    if args.set:
        from tunelab.config import config_from_dict

        base = config_from_dict(base.to_dict(), source=str(args.config), overrides=args.set)
    if args.study_name:
        spec.study_name = args.study_name
    if args.sampler:
        spec.sampler = args.sampler
    if args.pruner:
        spec.pruner = args.pruner
    if args.total_trials:
        spec.trials = args.total_trials
    result = run_sweep(base, spec, trials=args.trials, storage=args.storage)
    print(format_table(result))
    print(f"Study {result.study_name} in {result.storage}")
    for path in result.plots:
        print(f"Plot: {path}")
    if result.best_config_path:
        print(
            f"Best config: {result.best_config_path} (train it with: tunelab train "
            f"{result.best_config_path})"
        )
    return 0


def cmd_pilot(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.planning.pilot import parse_fractions, run_pilot

    config = load_config(args.config, args.set)
    result = run_pilot(config, parse_fractions(args.fractions), args.steps, out_dir=args.out)
    print("\nPilot says:")
    for line in result.advice:
        print(f"- {line}")
    return 0


def add_planning_commands(subparsers: argparse._SubParsersAction) -> None:
    from tunelab.planning.architecture import ESTIMATE_METHODS, shipped_configs

    est = subparsers.add_parser(
        "estimate",
        help="Parameters, peak memory, speed and which GPUs a fine-tuning run fits (no download).",
        description="Estimate a run from the model's config alone. MODEL is a shipped name ("
        + ", ".join(sorted(shipped_configs()))
        + "), a model folder, a config.json, or a hub id already in the local cache.",
    )
    est.add_argument("model", nargs="?", help="Model (default: the config's, or tunelab's).")
    est.add_argument(
        "--config",
        help="A tunelab run config to take the settings from (the options below override it).",
    )
    est.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Set any config key."
    )
    est.add_argument("--config-json", help="The model's config.json (for hub ids offline).")
    add_config_options(est, estimate_keys(), {"method": ESTIMATE_METHODS})
    est.add_argument("--devices", type=int, default=1, help="Processes training together.")
    est.add_argument(
        "--loss-fraction",
        type=float,
        default=1.0,
        help="Share of tokens that are loss targets (completion tokens); default 1.",
    )
    est.add_argument("--gpu", help="Estimate speed and advice for this GPU (default: this CPU).")
    est.add_argument("--utilization", type=float, help="Share of peak FLOP/s achieved.")
    est.add_argument("--epoch-tokens", type=int, default=1_000_000)
    est.add_argument(
        "--context",
        type=int,
        help="Mean example length, token-weighted (default max_length, the worst case): the "
        "attention's compute and, on a CPU, the attention weights it keeps.",
    )
    est.add_argument("--json", action="store_true", help="Print the estimate as JSON.")
    est.set_defaults(func=cmd_estimate)

    pilot = subparsers.add_parser(
        "pilot",
        help="Short learning-curve pilot: would more data or more steps pay?",
        description="Train CONFIG's recipe for --steps on growing shares of its data, evaluate "
        "the held-out loss along the way, and say whether more data or more steps are likely to "
        "pay. Runs go to OUTPUT_DIR/pilot (or --out).",
    )
    pilot.add_argument("config", help="A run config with eval_path or eval_split.")
    pilot.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pilot.add_argument("--fractions", default="0.25,0.5,1", help="Shares of the data (0.25,0.5,1).")
    pilot.add_argument("--steps", type=int, default=30, help="Optimizer steps per share (30).")
    pilot.add_argument("--out", help="Folder for the pilot runs (default OUTPUT_DIR/pilot).")
    pilot.set_defaults(func=cmd_pilot)

    sw = subparsers.add_parser(
        "sweep",
        help="Optuna hyperparameter search; each trial is a normal run folder.",
        description="Search the keys in CONFIG's 'sweep:' section (or --space FILE). The study "
        "is stored in OUTPUT_DIR/sweep.db unless --storage names another Optuna RDB URL; "
        "running the command again resumes it, and several workers may share one storage.",
    )
    sw.add_argument("config", help="Run config with a 'sweep:' section.")
    sw.add_argument("--space", help="Separate YAML file with the sweep section.")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--storage", help="Optuna RDB URL (default sqlite:///OUTPUT_DIR/sweep.db).")
    sw.add_argument("--study-name", help="Study name (default: the output folder's name).")
    sw.add_argument("--trials", type=int, help="Trials this worker runs at most.")
    sw.add_argument("--total-trials", type=int, help="Finished trials the study stops at.")
    sw.add_argument("--sampler", choices=("tpe", "random", "grid"))
    sw.add_argument("--pruner", choices=("median", "hyperband", "none"))
    sw.set_defaults(func=cmd_sweep)
