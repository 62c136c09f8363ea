"""`tunelab methods compare`: train several methods on the same token budget, side by side.

Each method trains in its own process, so its peak memory is its own and not the highest of
all runs before it.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunelab.config import METHODS, load_config
from tunelab.errors import TunelabError, did_you_mean
from tunelab.files import atomic_write_json, atomic_write_text, read_json_file
from tunelab.methods import PROMPT_METHODS
from tunelab.run_folder import damaged_run_fix, results_path

logger = logging.getLogger(__name__)


DEFAULT_METHODS = (
    "lora",
    "dora",
    "qlora",
    "ia3",
    "adalora",
    "prompt_tuning",
    "prefix_tuning",
    "full",
)
# the method extras, compared as variants of LoRA: name -> the config keys they set
VARIANTS = {
    "lora+": ["method=lora", "loraplus_lr_ratio=16"],
    "pissa": ["method=lora", "init_lora_weights=pissa"],
    "olora": ["method=lora", "init_lora_weights=olora"],
    "eva": ["method=lora", "init_lora_weights=eva"],
    "loftq": ["method=qlora", "quantization_bits=4", "init_lora_weights=loftq"],
    "neftune": ["method=lora", "neftune_noise_alpha=5"],
}
COLUMNS = ("method", "trainable", "share", "peak MiB", "tokens/s", "train tokens", "eval loss")


def tokens_per_step(config_path: Path, overrides: list[str], packing: bool) -> float:
    """Mean real tokens in one optimizer step when rows are packed or not."""
    from tunelab.api import FineTuner
    from tunelab.training.loop import steps_per_epoch

    config = load_config(config_path, [*overrides, f"packing={str(packing).lower()}"])
    rows = FineTuner(config).prepare_dataset()
    return sum(len(r) for r in rows) / steps_per_epoch(len(rows), config)


def compare_methods(
    config_path: str | Path,
    methods: list[str] | None = None,
    overrides: list[str] | None = None,
    token_budget: int | None = None,
    out_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train each method for about ``token_budget`` real tokens; returns one row per method.

    Without a budget, the budget is what ``max_steps`` (or 20 steps) of the packed config
    trains. Prompt methods train unpacked (PEFT adds their virtual tokens per sequence), so
    they get more steps for the same tokens.
    """
    config_path = Path(config_path)
    overrides = list(overrides or [])
    methods = list(methods or DEFAULT_METHODS)
    for method in methods:
        if method not in METHODS and method not in VARIANTS:
            known = [*METHODS, *VARIANTS]
            raise TunelabError(
                f"unknown method {method!r}; choose from {', '.join(known)}."
                f"{did_you_mean(method, known)}"
            )
    base = load_config(config_path, overrides)
    if not base.eval_path:
        raise TunelabError(
            f"{config_path}: methods compare needs eval_path (held-out data) to compare eval "
            "loss. Set it in the config or with --set eval_path=..."
        )
    out = Path(out_dir or Path(base.output_dir).parent / "methods-compare")
    from tunelab.ownership import check_output_files, record_files

    tables = [out / "methods_compare.json", out / "methods_compare.md"]
    check_output_files(out, [t.name for t in tables], "methods compare")
    out.mkdir(parents=True, exist_ok=True)
    per_step = {True: tokens_per_step(config_path, overrides, True)}
    if any(m in PROMPT_METHODS for m in methods):
        per_step[False] = tokens_per_step(config_path, overrides, False)
    budget = token_budget or int((base.max_steps or 20) * per_step[True])
    rows = []
    for method in methods:
        steps = max(1, math.ceil(budget / per_step[method not in PROMPT_METHODS]))
        run_dir = out / method
        command = [
            sys.executable,
            "-m",
            "tunelab.cli",
            "train",
            str(config_path),
            *[a for o in overrides for a in ("--set", o)],
            *[a for o in VARIANTS.get(method, [f"method={method}"]) for a in ("--set", o)],
            "--set",
            f"max_steps={steps}",
            "--set",
            f"output_dir={run_dir}",
            "--overwrite",
        ]
        logger.info("== %s: %d steps", method, steps)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append(
                {"method": method, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
            )
            logger.info("   failed: %s", rows[-1]["error"])
            continue
        results = read_json_file(results_path(run_dir), damaged_run_fix(run_dir))
        rows.append(
            {
                "method": method,
                "trainable_parameters": results["trainable_parameters"],
                "trainable_share": results["trainable_parameters"] / results["total_parameters"],
                "peak_memory_mb": results["peak_memory_mb"],
                "tokens_per_second": results["tokens_per_second"],
                "train_tokens": results["train_tokens"],
                "eval_loss": results.get("eval_loss"),
                "initial_eval_loss": results.get("initial_eval_loss"),
            }
        )
    table = format_table(rows)
    atomic_write_json(tables[0], rows)
    atomic_write_text(tables[1], table + "\n")
    record_files(out, "comparison", tables)
    logger.info("%s", table)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the comparison."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        lines.append(
            f"| {r['method']} | {r['trainable_parameters']:,} | {r['trainable_share']:.2%} | "
            f"{r['peak_memory_mb']:.0f} | {r['tokens_per_second']:.0f} | {r['train_tokens']:,} "
            f"| {loss} |"
        )
    return "\n".join(lines)
