"""What the app shows of a run folder: its state, progress and curves, read from the files
training writes (so runs started from the CLI look the same as runs started here)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunelab.run_folder import CONFIG, EVAL_REPORT_HTML, checkpoints_path, metrics_path
from tunelab.runs.folders import find_runs, load_run
from tunelab.ui.jobs import Jobs

# a run with no process of ours counts as running while its metrics moved this recently
LIVE_SECONDS = 30.0


def run_folders(workspace: Path, jobs: Jobs) -> list[Path]:
    """Run folders under the workspace plus the ones this app is training (which may not have
    written their config yet), newest first."""
    found = {path.resolve() for path in find_runs(workspace)}
    found |= {Path(job.target).resolve() for job in jobs.jobs.values() if job.kind == "train"}
    return sorted(found, key=_modified, reverse=True)


def _modified(path: Path) -> float:
    for candidate in (metrics_path(path), path / CONFIG, path):
        if candidate.exists():
            return candidate.stat().st_mtime
    return 0.0


def run_state(path: Path, jobs: Jobs) -> dict[str, Any]:
    """State, progress, last values and curves of the run in ``path``.

    state: running, stopped (a checkpoint to resume from), finished, failed or waiting.
    """
    job = jobs.get("train", str(path))
    has_config = (path / CONFIG).is_file()
    run = load_run(path) if has_config else None
    train = run.train if run else []
    evals = run.evals if run else []
    results = run.results if run else None
    checkpoints = checkpoints_path(path)
    has_checkpoint = checkpoints.is_dir() and any(checkpoints.iterdir())
    metrics = metrics_path(path)
    if job is not None and job.running:
        state = "running"
    elif results is not None:
        state = "finished"
    elif job is None and metrics.is_file() and time.time() - metrics.stat().st_mtime < LIVE_SECONDS:
        state = "running"  # started elsewhere (the CLI) and still writing
    elif has_checkpoint:
        state = "stopped"
    elif job is not None:
        state = "failed"
    else:
        state = "waiting"
    config = run.config if run else {}
    step = train[-1]["step"] if train else 0
    total = config.get("max_steps")
    if not total and train and train[-1].get("epoch"):
        total = round(config.get("num_epochs", 1) * step / train[-1]["epoch"])
    return {
        "path": str(path),
        "name": path.name,
        "state": state,
        "step": step,
        "total_steps": total,
        "loss": train[-1].get("loss") if train else None,
        "eval_loss": evals[-1].get("eval_loss") if evals else None,
        "tokens_per_second": train[-1].get("tokens_per_second") if train else None,
        "curves": {
            "loss": [[r["step"], r["loss"]] for r in train if r.get("loss") is not None],
            "lr": [[r["step"], r["lr"]] for r in train if r.get("lr") is not None],
            "eval_loss": [[r["step"], r["eval_loss"]] for r in evals],
            "tokens_per_second": [
                [r["step"], r["tokens_per_second"]]
                for r in train
                if r.get("tokens_per_second") is not None
            ],
        },
        "results": results,
        "eval_report": str(report) if (report := path / EVAL_REPORT_HTML).is_file() else None,
        "log": job.log_tail() if job else "",
        "returncode": job.returncode if job else None,
    }
