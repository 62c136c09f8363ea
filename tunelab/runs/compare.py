"""``tunelab runs compare``: the text, a PNG of the overlaid loss curves and a self-contained
HTML page."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.figures import new_figure
from tunelab.files import atomic_write_text, save_figure
from tunelab.html_pages import render
from tunelab.loss_curves import COLORS, Curve, draw_loss, loss_svg, points
from tunelab.runs.folders import Run, load_run
from tunelab.runs.tables import (
    compare_text,
    config_value,
    differing_config,
    metric_header,
    metric_rows,
    run_names,
)


def run_curves(runs: list[Run]) -> list[Curve]:
    """Each run's train (solid) and eval (dashed, dotted) loss, one colour per run."""
    curves = []
    for index, (name, run) in enumerate(zip(run_names(runs), runs, strict=True)):
        color = COLORS[index % len(COLORS)]
        curves.append(Curve(f"{name} train", points(run.train, "loss"), color))
        curves.append(Curve(f"{name} eval", points(run.evals, "eval_loss"), color, True, True))
    return curves


def plot_png(runs: list[Run], path: Path) -> Path:
    """Overlaid train (solid) and eval (dashed) loss curves of every run."""
    figure = new_figure((9, 5))
    axes = figure.subplots()
    draw_loss(axes, run_curves(runs), markersize=3)
    axes.set_title("Loss curves")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)


def compare_html(runs: list[Run]) -> str:
    """A self-contained page: the differing config, the metrics and the loss curves."""
    names = run_names(runs)
    differing = differing_config(runs)
    config_rows = [[key] + [config_value(v) for v in values] for key, values in differing.items()]
    return render(
        "compare.html",
        paths=[str(run.path) for run in runs],
        names=names,
        config_rows=config_rows,
        metric_header=metric_header(),
        metric_rows=metric_rows(runs, names),
        curves=loss_svg(run_curves(runs)),
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
