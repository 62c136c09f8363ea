"""``tunelab estimate`` and ``tunelab sweep``."""

from __future__ import annotations

import argparse
import json

from tunelab.planning.memory import OPTIMIZER_BYTES, TrainingSetup


def cmd_estimate(args: argparse.Namespace) -> int:
    from tunelab.planning.architecture import ESTIMATE_METHODS
    from tunelab.planning.estimate import format_estimate, run_estimate

    values = dict(
        method=args.method,
        lora_r=args.lora_r,
        target_modules=args.target_modules,
        lora_dropout=args.lora_dropout,
        batch_size=args.batch_size,
        max_length=args.max_length,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        devices=args.devices,
        sharding=args.sharding,
        loss_fraction=args.loss_fraction,
        quantization_bits=args.quantization_bits,
    )
    model = args.model
    if args.config:  # a run config supplies the model and its training settings
        from tunelab.config import load_config
        from tunelab.errors import TunelabError

        config = load_config(args.config, args.set)
        if config.method not in ESTIMATE_METHODS:
            raise TunelabError(
                f"{args.config}: method {config.method!r} has no estimate; estimates cover "
                f"{', '.join(ESTIMATE_METHODS)}."
            )
        values.update(
            method=config.method,
            lora_r=config.lora_r,
            target_modules=list(config.target_modules),
            lora_dropout=config.lora_dropout,
            batch_size=config.batch_size,
            max_length=config.max_length,
            gradient_checkpointing=config.gradient_checkpointing,
            optimizer=config.optimizer,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            quantization_bits=config.quantization_bits,
        )
        if config.precision != "auto":
            values["precision"] = config.precision
        model = model or config.model_name
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
    print(f"Pilot: {args.steps} steps on each share of the data ({args.fractions}).")
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
    est.add_argument("--config", help="A tunelab run config to take the settings from.")
    est.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    est.add_argument("--config-json", help="The model's config.json (for hub ids offline).")
    est.add_argument("--method", default="lora", choices=ESTIMATE_METHODS)
    est.add_argument("--lora-r", type=int, default=8)
    est.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"])
    est.add_argument("--lora-dropout", type=float, default=0.1)
    est.add_argument("--batch-size", type=int, default=4)
    est.add_argument("--max-length", type=int, default=512)
    est.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    est.add_argument("--gradient-checkpointing", action="store_true")
    est.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZER_BYTES))
    est.add_argument("--gradient-accumulation-steps", type=int, default=1)
    est.add_argument("--devices", type=int, default=1)
    est.add_argument("--sharding", default="none", choices=("none", "fsdp"))
    est.add_argument("--quantization-bits", type=int, default=4, choices=(4, 8))
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
