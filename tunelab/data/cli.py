"""``tunelab data inspect | prepare | preview``: the data stage on its own, from the shell.

Handlers only parse and call the Python API; errors are ``TunelabError`` and the main CLI
prints them without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from tunelab.config import FineTuningConfig, config_from_dict, load_config
from tunelab.data.prepare import PreparedData, format_summary, prepare_examples, write_prepared
from tunelab.data.report import write_reports
from tunelab.data.tokenize import IGNORE_INDEX, tokenize_example, uses_chat_template
from tunelab.errors import TunelabError
from tunelab.ownership import (
    check_output_files,
    check_separate,
    finish_output_folder,
    prepare_output_folder,
    record_files,
)
from tunelab.text_safety import visible

REPORT_FILES = ("report.md", "report.html")

_CONFIG_SUFFIXES = (".yaml", ".yml")


def add_data_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``data`` with ``inspect``, ``prepare`` and ``preview`` on an argparse
    subparsers object; each sub-command's ``func`` default takes the parsed args."""
    data = subparsers.add_parser("data", help="Inspect, clean and preview training data.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="Summarise a dataset and write report.md and report.html."
    )
    inspect.add_argument("source", help="A data file or folder, or a run config (.yaml).")
    inspect.add_argument(
        "--out", default="data-report", help="Report folder (default: %(default)s)."
    )
    inspect.add_argument(
        "--model", help="Tokenizer for token statistics when SOURCE is a data path (default: none)."
    )
    _add_set(inspect)
    inspect.set_defaults(func=inspect_command)

    prepare = commands.add_parser(
        "prepare", help="Write the processed dataset (jsonl) and manifest.json."
    )
    prepare.add_argument("config", help="A run config (.yaml).")
    prepare.add_argument("--out", help="Output folder (default: <output_dir>/data).")
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the prepared data tunelab wrote in --out before (nothing else).",
    )
    _add_set(prepare)
    prepare.set_defaults(func=prepare_command)

    pairs = commands.add_parser(
        "pairs",
        help="Make preference pairs: the data's answer as chosen, a model's own as rejected.",
    )
    pairs.add_argument("source", help="Prompt/completion data, or a run config (.yaml).")
    pairs.add_argument("--model", required=True, help="Run folder or model that answers.")
    pairs.add_argument("--out", required=True, help="Pairs file (.jsonl); resumed if it exists.")
    pairs.add_argument("--max-new-tokens", type=int, default=128)
    pairs.add_argument("--batch-size", type=int, default=8)
    pairs.add_argument("--temperature", type=float, default=0.7)
    pairs.add_argument("--limit", type=int, help="Pair only the first N rows.")
    pairs.add_argument("--seed", type=int, default=0)
    _add_set(pairs)
    pairs.set_defaults(func=pairs_command)

    preview = commands.add_parser(
        "preview", help="Show rendered examples with the tokens the loss covers highlighted."
    )
    preview.add_argument("config", help="A run config (.yaml).")
    preview.add_argument("-n", "--count", type=int, default=3, help="Examples to show.")
    preview.add_argument("--split", choices=("train", "eval"), default="train")
    _add_set(preview)
    preview.set_defaults(func=preview_command)
    return data


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Override a config key."
    )


def _config(source: str, overrides: list[str]) -> FineTuningConfig:
    if source.lower().endswith(_CONFIG_SUFFIXES):
        return load_config(source, overrides)
    return config_from_dict({"dataset_path": source}, source="data inspect", overrides=overrides)


def _inputs(config: FineTuningConfig) -> dict[str, str | None]:
    return {"dataset_path": config.dataset_path, "eval_path": config.eval_path}


def _tokenizer(config: FineTuningConfig) -> Any:
    from tunelab.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(config.model_name), config.trust_remote_code)


def pairs_command(args: argparse.Namespace) -> int:
    from tunelab.preference_pairs import make_pairs

    counts = make_pairs(
        _config(args.source, args.set), args.model, args.out, args.max_new_tokens,
        args.batch_size, args.temperature, seed=args.seed, limit=args.limit,
    )  # fmt: skip
    print(
        f"{counts['written']} pairs written to {counts['out']} ({counts['already_there']} were "
        f"there, {counts['skipped']} answers equal to the reference skipped); rejected answers "
        f"by {counts['rejected_model']}."
    )
    return 0


def _preference_summary(config: FineTuningConfig) -> str:
    """The summary training prints for a preference config's data (read and checked as that
    objective reads it, KTO's label counts and balance with the config's weights)."""
    from tunelab.data.preference import format_preference_summary, prepare_preference

    weights = (config.desirable_weight, config.undesirable_weight)
    return format_preference_summary(prepare_preference(config).manifest, weights)


def _refuse_preference(config: FineTuningConfig, command: str) -> None:
    """Preference data is read again by each run, not prepared or previewed as SFT rows (which
    refused its pairs as an unknown schema, or its label: false rows as bad SFT data)."""
    if config.objective != "sft":
        raise TunelabError(
            f"tunelab data {command} works on SFT data, and this config trains objective "
            f"{config.objective}, whose preference data each run reads and checks itself. Run "
            "'tunelab data inspect CONFIG' for its summary."
        )


def inspect_command(args: argparse.Namespace) -> int:
    config = _config(args.source, args.set)
    if config.objective != "sft":  # no SFT report: the preference summary training prints
        print(_preference_summary(config))
        return 0
    if args.model:
        config = dataclasses.replace(config, model_name=args.model)
    check_separate(args.out, _inputs(config), "--out")
    check_output_files(args.out, REPORT_FILES, "data inspect")
    is_config = args.source.lower().endswith(_CONFIG_SUFFIXES)
    tokenizer = _tokenizer(config) if is_config or args.model else None
    prepared = prepare_examples(config, tokenizer)
    print(format_summary(prepared.manifest))
    _print_details(prepared)
    markdown, page = write_reports(prepared.manifest, args.out)
    record_files(args.out, "report", [markdown, page])
    print(f"Report: {markdown} and {page}")
    return 0


def _print_details(prepared: PreparedData) -> None:
    manifest = prepared.manifest
    for split, section in (manifest.get("lengths") or {}).items():
        for unit in ("chars", "tokens"):
            stats = section.get(unit)
            if stats:
                print(
                    f"  {split} {unit}: mean {stats['mean']}, median {stats['p50']}, "
                    f"p95 {stats['p95']}, max {stats['max']}"
                )
        if "truncated" in section:
            print(
                f"  {split}: {section['truncated']} ({section['truncation_rate']:.1%}) longer "
                f"than max_length {section['max_length']}"
            )
    bias_section = manifest.get("bias") or {}
    for dimension, info in (bias_section.get("before") or {}).get("dimensions", {}).items():
        ratio = info["imbalance_ratio"]
        print(
            f"  bias {dimension}: "
            + ", ".join(f"{g} {n}" for g, n in info["mentions"].items())
            + f" (imbalance {ratio if ratio is not None else 'inf'})"
        )


def prepare_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    _refuse_preference(config, "prepare")
    out = Path(args.out) if args.out else Path(config.output_dir) / "data"
    # checked before the data is read: the raw data must never be what gets replaced
    check_separate(out, _inputs(config), "--out")
    prepare_output_folder(out, "data", args.overwrite, "--out")
    prepared = prepare_examples(config, _tokenizer(config))
    written = write_prepared(prepared, out)
    finish_output_folder(out, "data")
    print(format_summary(prepared.manifest))
    print("Wrote " + ", ".join(str(p) for p in written))
    return 0


def preview_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    _refuse_preference(config, "preview")
    tokenizer = _tokenizer(config)
    prepared = prepare_examples(config, tokenizer)
    examples = prepared.train if args.split == "train" else prepared.eval or []
    chat = uses_chat_template(tokenizer, config.chat_format)
    colour = sys.stdout.isatty()
    legend = "green" if colour else "[[ ]]"
    print(
        f"Tokens the loss covers are shown in {legend}; chat template: {'yes' if chat else 'no'}."
    )
    for example in examples[: args.count]:
        tokenized = tokenize_example(
            example, tokenizer, config.max_length, chat, config.system_prompt
        )
        print(f"\n--- {visible(example.origin)} ({len(tokenized.input_ids)} tokens, "
              f"{tokenized.num_loss_tokens} in the loss"
              f"{', truncated' if tokenized.truncated else ''}) ---")  # fmt: skip
        print(render_loss_spans(tokenizer, tokenized.input_ids, tokenized.labels, colour))
    return 0


def loss_spans(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The decoded text in runs, each with whether the loss covers it (what preview marks)."""
    spans, start = [], 0
    for end in range(1, len(input_ids) + 1):
        inside = labels[start] != IGNORE_INDEX
        if end < len(input_ids) and (labels[end] != IGNORE_INDEX) == inside:
            continue
        spans.append((tokenizer.decode(input_ids[start:end]), inside))
        start = end
    return spans


def render_loss_spans(tokenizer: Any, input_ids: list[int], labels: list[int], colour: bool) -> str:
    """The decoded tokens with the runs inside the loss marked (ANSI green or [[brackets]])."""
    pieces = []
    for raw, inside in loss_spans(tokenizer, input_ids, labels):
        # the data's own escape sequences shown, not run; tunelab's colour added after
        text = visible(raw)
        if inside:
            text = f"\033[42;30m{text}\033[0m" if colour else f"[[{text}]]"
        pieces.append(text)
    return "".join(pieces)
