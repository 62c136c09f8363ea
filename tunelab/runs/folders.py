"""Finding run folders and reading one into a :class:`Run` (config, results, metric records)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.run_folder import (
    CHECKPOINTS,
    CONFIG,
    read_metrics,
    read_results,
    read_saved_config,
    split_metrics,
)


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
        for p in root.rglob(CONFIG)
        if CHECKPOINTS not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found)


def load_run(path: str | Path) -> Run:
    """A run folder's config, results and metric lines (an unfinished run has no results)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise TunelabError(
            f"{path} is not a tunelab run folder (no {CONFIG}). Pass the output_dir of "
            "'tunelab train'; 'tunelab runs list' shows the runs it finds."
        )
    config = read_saved_config(path)
    results = read_results(path)
    train, evals = split_metrics(read_metrics(path))
    return Run(path, config, results, train, evals)
