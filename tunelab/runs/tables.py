"""The text of ``tunelab runs list`` and ``runs compare``: metric and config tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.run_folder import CONFIG
from tunelab.runs.folders import Run, find_runs, load_run

METRIC_COLUMNS = (
    ("steps", "steps", 0),
    ("final_train_loss", "train loss", 4),
    ("eval_loss", "eval loss", 4),
    ("best_eval_loss", "best eval", 4),
    ("train_runtime_seconds", "time s", 1),
    ("tokens_per_second", "tokens/s", 0),
)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def config_value(value: Any) -> str:
    """A config value as a table cell (lists, mappings and None as JSON)."""
    return json.dumps(value) if isinstance(value, list | dict) or value is None else str(value)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def metric_rows(runs: list[Run], names: list[str]) -> list[list[str]]:
    rows = []
    for name, run in zip(names, runs, strict=True):
        row = [name, "finished" if run.finished else "unfinished"]
        for key, _, digits in METRIC_COLUMNS:
            value = run.metric(key)
            if isinstance(value, int | float) and digits == 0:
                value = f"{value:,.0f}"
            elif isinstance(value, int | float):
                value = f"{float(value):.{digits}f}"
            row.append(_number(value))
        rows.append(row)
    return rows


def metric_header() -> list[str]:
    return ["run", "status"] + [label for _, label, _ in METRIC_COLUMNS]


def list_runs(root: str | Path = "outputs") -> str:
    """The ``runs list`` table: each run's method, model, status and metrics."""
    paths = find_runs(root)
    if not paths:
        return f"No runs under {root} (a run folder holds {CONFIG})."
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except TunelabError as exc:  # one damaged run must not hide the others
            skipped.append(f"skipped {path}: {exc}")
    paths = [run.path for run in runs]
    if not runs:
        return "\n".join(skipped)
    names = [str(p.relative_to(root)) if p != Path(root) else str(p) for p in paths]
    header = metric_header()[:2] + ["method", "model"] + metric_header()[2:]
    rows = []
    for row, run in zip(metric_rows(runs, names), runs, strict=True):
        model = str(run.config.get("model_name", "-"))
        rows.append(row[:2] + [str(run.config.get("method", "lora")), Path(model).name] + row[2:])
    return "\n".join([format_table(header, rows), *skipped])


def differing_config(runs: list[Run]) -> dict[str, list[Any]]:
    """Config keys whose values differ between the runs (output_dir aside: it always does)."""
    keys = sorted({k for run in runs for k in run.config} - {"output_dir"})
    return {
        key: [run.config.get(key) for run in runs]
        for key in keys
        if len({json.dumps(run.config.get(key), sort_keys=True) for run in runs}) > 1
    }


def run_names(runs: list[Run]) -> list[str]:
    """Short names: the folder names, or the paths when folder names repeat."""
    names = [run.path.name for run in runs]
    return names if len(set(names)) == len(names) else [str(run.path) for run in runs]


def compare_text(runs: list[Run]) -> str:
    names = run_names(runs)
    differing = differing_config(runs)
    parts = []
    if differing:
        rows = [[key] + [config_value(v) for v in values] for key, values in differing.items()]
        parts.append("Config (only what differs):\n" + format_table(["key", *names], rows))
    else:
        parts.append("Config: identical (apart from output_dir).")
    parts.append("Metrics:\n" + format_table(metric_header(), metric_rows(runs, names)))
    return "\n\n".join(parts)
