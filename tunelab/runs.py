"""``tunelab runs list | compare``: find run folders, and compare their configs, metrics and loss
curves side by side (a text table, a PNG and a self-contained HTML page)."""

from __future__ import annotations

import argparse
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.files import atomic_write_text, check_safetensors, read_json_file, save_figure
from tunelab.text_safety import visible

RUN_CONFIG = "tunelab_config.yaml"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    results: dict[str, Any] | None
    train: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", ...}
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "eval_loss", ...}

    @property
    def finished(self) -> bool:
        return self.results is not None

    def metric(self, key: str) -> Any:
        """A results.json value, else what metrics.jsonl shows for an unfinished run."""
        if self.results is not None and key in self.results:
            return self.results[key]
        if key == "final_train_loss" and self.train:
            return self.train[-1].get("loss")
        if key == "eval_loss" and self.evals:
            return self.evals[-1].get("eval_loss")
        if key == "best_eval_loss":
            losses = [e["eval_loss"] for e in self.evals if e.get("step", 0) > 0]
            return min(losses) if losses else None
        if key == "steps" and self.train:
            return self.train[-1].get("step")
        return None


def damaged_run_fix(folder: Path) -> str:
    """What to do about a run folder whose files were cut off (a full disk, a crash)."""
    if not (Path(folder) / "metrics.jsonl").is_file():  # a merged or downloaded model
        return (
            "The model folder is incomplete (cut off while being written or copied): write it "
            "again (tunelab merge, or copy it again from where it came from)."
        )
    return (
        f"The run's save did not complete (a full disk or a crash while saving). Free some "
        f"space, then train again with --resume (from its last checkpoint) or --overwrite; "
        f"'tunelab doctor {folder}' shows what the run got to."
    )


def check_run_files(folder: str | Path) -> None:
    """Raise TunelabError naming the first damaged or missing file of a saved run or model
    folder: every top-level .json must parse, every .safetensors must be whole, the saved
    tunelab_config.yaml must parse, and an adapter folder must hold its weights and tokenizer.
    """
    import yaml

    folder = Path(folder)
    fix = damaged_run_fix(folder)
    for path in sorted(folder.glob("*.json")):
        read_json_file(path, fix)
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path, fix)
    config_path = folder / RUN_CONFIG
    if config_path.is_file():
        try:
            yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise TunelabError(
                f"{config_path} is damaged (not valid YAML: {error}). {fix}"
            ) from None
    _check_recorded_sizes(folder, fix)
    if (folder / "adapter_config.json").is_file():
        weights = ("adapter_model.safetensors", "adapter_model.bin")
        if not any((folder / name).is_file() for name in weights):
            raise TunelabError(f"{folder / weights[0]} is missing. {fix}")
        if not (folder / "tokenizer_config.json").is_file():
            raise TunelabError(f"{folder / 'tokenizer_config.json'} is missing. {fix}")


# The saved files whose size the manifest vouches for: those a cut can leave still readable (the
# saved config cut at a line boundary loses its last keys, and defaults would silently stand in
# for them; a tokenizer's text files; weights). A .json file is not here: a cut one no longer
# parses (named above), and a whole one of another size is an edit users make on purpose
# (adapter_config.json repointed at a moved base, a chat template fixed in tokenizer_config).
# metrics.jsonl is not either: a resumed run appends to it.
_SIZE_CHECKED = (
    RUN_CONFIG, "*.safetensors", "*.bin", "tokenizer.model", "merges.txt", "vocab.txt",
    "chat_template.jinja",
)  # fmt: skip


def _check_recorded_sizes(folder: Path, fix: str) -> None:
    """Raise TunelabError naming a top-level file whose size differs from what the folder's
    complete manifest recorded when tunelab wrote it."""
    import fnmatch

    from tunelab.ownership import read_manifest

    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete", False):
        return  # a run from before manifests, or one still being written: nothing recorded
    for name, size in sorted(manifest["files"].items()):
        if "/" in name or not any(fnmatch.fnmatch(name, p) for p in _SIZE_CHECKED):
            continue
        path = folder / name
        try:
            actual = path.lstat().st_size
        except OSError:
            continue  # a missing file is named by the checks that need it
        if isinstance(size, int) and actual != size:
            raise TunelabError(
                f"{path} is {actual} bytes but tunelab wrote {size}: it was cut off or edited. "
                f"{fix}"
            )


def find_runs(root: str | Path = "outputs") -> list[Path]:
    """Run folders under ``root`` (any depth), found by their tunelab_config.yaml."""
    root = Path(root)
    if not root.is_dir():
        raise TunelabError(
            f"{root} is not a folder. Pass the folder that holds your runs, e.g. "
            "tunelab runs list outputs"
        )
    # checkpoints and a save's temporary folders (".final-save-...") are not runs
    found = [
        p.parent
        for p in root.rglob(RUN_CONFIG)
        if "checkpoints" not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found)


def read_saved_config(config_path: Path) -> dict[str, Any]:
    """The mapping in a run's saved tunelab_config.yaml; TunelabError (naming the file and
    line) when it is not valid YAML, not UTF-8, or not a mapping."""
    import yaml

    from tunelab.yaml_numbers import load_yaml

    try:
        values = load_yaml(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TunelabError(
            f"{config_path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}). "
            "The run's saved config was edited or damaged: restore it from the config you "
            "trained with."
        ) from None
    except UnicodeDecodeError:
        raise TunelabError(
            f"{config_path}: not UTF-8 text. Restore it from the config you trained with."
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TunelabError(
            f"{config_path}: expected 'key: value' lines, found a {type(values).__name__}. "
            "Restore it from the config you trained with."
        )
    return values


def load_run(path: str | Path) -> Run:
    """A run folder's config, results and metric lines (an unfinished run has no results)."""
    path = Path(path)
    config_path = path / RUN_CONFIG
    if not config_path.is_file():
        raise TunelabError(
            f"{path} is not a tunelab run folder (no {RUN_CONFIG}). Pass the output_dir of "
            "'tunelab train'; 'tunelab runs list' shows the runs it finds."
        )
    fix = damaged_run_fix(path)
    config = read_saved_config(config_path)
    results_path = path / "results.json"
    results = read_json_file(results_path, fix) if results_path.is_file() else None
    if results is not None and not isinstance(results, dict):
        raise TunelabError(f"{results_path} is damaged (not a JSON object). {fix}")
    train, evals = [], []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for number, line in enumerate(metrics.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise TunelabError(
                    f"{metrics}:{number} is not valid JSON; the file was cut off or edited. "
                    "Delete that line, or check the run with tunelab doctor."
                ) from None
            if "loss" in record:
                train.append(record)
            if "eval_loss" in record:
                evals.append(record)
    return Run(path, config, results, train, evals)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _config_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) or value is None else str(value)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


METRIC_COLUMNS = (
    ("steps", "steps", 0),
    ("final_train_loss", "train loss", 4),
    ("eval_loss", "eval loss", 4),
    ("best_eval_loss", "best eval", 4),
    ("train_runtime_seconds", "time s", 1),
    ("tokens_per_second", "tokens/s", 0),
)


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
        return f"No runs under {root} (a run folder holds {RUN_CONFIG})."
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
        rows = [[key] + [_config_value(v) for v in values] for key, values in differing.items()]
        parts.append("Config (only what differs):\n" + format_table(["key", *names], rows))
    else:
        parts.append("Config: identical (apart from output_dir).")
    parts.append("Metrics:\n" + format_table(metric_header(), metric_rows(runs, names)))
    return "\n\n".join(parts)


def _curves(run: Run) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    def finite(records: list[dict], key: str) -> list[tuple[float, float]]:
        return [
            (float(r["step"]), float(r[key]))
            for r in records
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]

    return finite(run.train, "loss"), finite(run.evals, "eval_loss")


def plot_png(runs: list[Run], path: Path) -> Path:
    """Overlaid train (solid) and eval (dashed) loss curves of every run."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise TunelabError(
            "the loss-curve PNG needs matplotlib, which is not installed. Install it with: "
            "pip install matplotlib (or use the HTML page, which needs nothing)."
        ) from None
    figure, axes = plt.subplots(figsize=(9, 5))
    for index, (name, run) in enumerate(zip(run_names(runs), runs, strict=True)):
        color = COLORS[index % len(COLORS)]
        train, evals = _curves(run)
        if train:
            axes.plot(*zip(*train, strict=True), color=color, label=f"{name} train")
        if evals:
            axes.plot(
                *zip(*evals, strict=True), "--o", color=color, markersize=3, label=f"{name} eval"
            )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("Loss curves")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        return save_figure(figure, path, dpi=120)
    finally:
        plt.close(figure)


def loss_svg(runs: list[Run], width: int = 820, height: int = 420) -> str:
    """The same curves as an inline SVG (no JavaScript, no external files)."""
    series = []
    for index, (name, run) in enumerate(zip(run_names(runs), runs, strict=True)):
        train, evals = _curves(run)
        color = COLORS[index % len(COLORS)]
        series += [(f"{name} train", color, train, False), (f"{name} eval", color, evals, True)]
    points = [p for _, _, values, _ in series for p in values]
    if not points:
        return "<p>No loss values logged yet.</p>"
    left, right, top, bottom = 60, 200, 20, 40
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_max - x_min) or 1.0, (y_max - y_min) or 1.0

    def x(v: float) -> float:
        return left + (v - x_min) / x_span * (width - left - right)

    def y(v: float) -> float:
        return top + (y_max - v) / y_span * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="none" stroke="#999"/>',
    ]
    for i in range(5):
        value = y_min + y_span * i / 4
        parts.append(
            f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3f}</text>'
        )
        step = x_min + x_span * i / 4
        parts.append(
            f'<text x="{x(step):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
            f"{step:.0f}</text>"
        )
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">'
        "optimizer step</text>"
    )
    legend_y = top + 10
    for label, color, values, dashed in series:
        if not values:
            continue
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        coords = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in values)
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} points="{coords}"/>'
        )
        parts.append(
            f'<line x1="{width - right + 10}" y1="{legend_y - 4}" x2="{width - right + 34}" '
            f'y2="{legend_y - 4}" stroke="{color}" stroke-width="2"{dash}/>'
            f'<text x="{width - right + 40}" y="{legend_y}">{html.escape(label)}</text>'
        )
        legend_y += 16
    parts.append("</svg>")
    return "\n".join(parts)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def compare_html(runs: list[Run]) -> str:
    """A self-contained page: the differing config, the metrics and the loss curves."""
    names = run_names(runs)
    differing = differing_config(runs)
    config_rows = [[key] + [_config_value(v) for v in values] for key, values in differing.items()]
    config_part = (
        _html_table(["key", *names], config_rows)
        if config_rows
        else "<p>Identical (apart from output_dir).</p>"
    )
    paths = "".join(f"<li>{html.escape(str(run.path))}</li>" for run in runs)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>tunelab run comparison"
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "</style></head><body>\n<h1>Run comparison</h1>\n"
        f"<ul>{paths}</ul>\n<h2>Config (only what differs)</h2>\n{config_part}\n"
        f"<h2>Metrics</h2>\n{_html_table(metric_header(), metric_rows(runs, names))}\n"
        f"<h2>Loss curves</h2>\n<p>Solid: train loss; dashed: eval loss.</p>\n{loss_svg(runs)}\n"
        "</body></html>\n"
    )


def compare_runs(paths: list[str], out: str | Path | None, plot: bool = True) -> str:
    """Print-ready comparison text; writes loss_curves.png and compare.html into ``out``."""
    if len(paths) < 2:
        raise TunelabError(
            f"runs compare needs at least two run folders, got {len(paths)}. Example: tunelab "
            "runs compare outputs/run-a outputs/run-b"
        )
    runs = [load_run(p) for p in paths]
    text = compare_text(runs)
    if out is not None:
        from tunelab.ownership import check_output_files, check_separate, record_files

        folder = Path(out)
        check_separate(folder, {f"run {p}": p for p in paths}, "--out")
        check_output_files(folder, ["compare.html", "loss_curves.png"], "runs compare")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "compare.html", compare_html(runs))
        written = [folder / "compare.html"]
        record_files(folder, "comparison", written)  # at once: the plot below may fail
        if plot:
            written.insert(0, plot_png(runs, folder / "loss_curves.png"))
            record_files(folder, "comparison", written[:1])
        text += "\n\nWrote " + ", ".join(str(p) for p in written)
    return text


def add_runs_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``runs list`` and ``runs compare`` on an argparse subparsers object."""
    runs = subparsers.add_parser("runs", help="List run folders and compare runs.")
    commands = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = commands.add_parser(
        "list", help="Find run folders (by tunelab_config.yaml) and show their metrics."
    )
    listing.add_argument(
        "root", nargs="?", default="outputs", help="Folder searched recursively (default: outputs)."
    )
    listing.set_defaults(func=lambda args: print(visible(list_runs(args.root))) or 0)
    compare = commands.add_parser(
        "compare",
        help="Config differences, final and best metrics, and overlaid loss curves of runs.",
        description="Prints the config keys that differ and each run's metrics; writes "
        "loss_curves.png and a self-contained compare.html into --out.",
    )
    compare.add_argument("runs", nargs="+", help="Two or more run folders.")
    compare.add_argument(
        "--out",
        default="runs-compare",
        help="Folder for loss_curves.png and compare.html (default: runs-compare).",
    )
    compare.add_argument("--no-plot", action="store_true", help="Skip the PNG (HTML only).")
    compare.set_defaults(
        func=lambda args: print(visible(compare_runs(args.runs, args.out, not args.no_plot))) or 0
    )
    return runs
