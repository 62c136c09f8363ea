"""Metric sinks beyond metrics.jsonl: TensorBoard event files, MLflow, Weights & Biases, and a
PNG of the curves.

Each is optional and imported only when asked for, with a message naming the extra to install.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError


def _missing(package: str, sink: str) -> TunelabError:
    return TunelabError(
        f"report_to includes {sink}, but the '{package}' package is not installed. Install it "
        f"with: pip install {package}   (or remove {sink} from report_to)."
    )


class Reporters:
    """Forwards every metric record to the sinks named in ``config.report_to``."""

    def __init__(self, config: FineTuningConfig, run_dir: Path, resume_step: int = 0) -> None:
        self.tensorboard: Any = None
        self.mlflow: Any = None
        self.wandb: Any = None
        if "tensorboard" in config.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise _missing("tensorboard", "tensorboard") from None
            # purge_step drops events past the checkpoint, so a resumed run reads as one
            self.tensorboard = SummaryWriter(
                str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None
            )
        if "mlflow" in config.report_to:
            try:
                import mlflow
            except ImportError:
                raise _missing("mlflow", "mlflow") from None
            uri = config.mlflow_tracking_uri or (Path(run_dir).resolve() / "mlruns").as_uri()
            if uri.startswith("file:"):
                # MLflow 3 refuses its file store unless told: a local folder is what we want
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("tunelab")
            mlflow.start_run(run_name=Path(run_dir).name)
            mlflow.log_params({k: str(v)[:250] for k, v in config.to_dict().items()})
            self.mlflow = mlflow

        if "wandb" in config.report_to:
            try:
                import wandb
            except ImportError:
                raise _missing("wandb", "wandb") from None
            run_dir = Path(run_dir).resolve()
            # one W&B run per run folder, so a resumed run continues the same curves
            run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "tunelab"),
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config.to_dict(),
            )

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        values = {k: float(v) for k, v in record.items() if k != "step" and v is not None}
        if self.tensorboard is not None:
            for key, value in values.items():
                group = "eval" if key.startswith("eval_") else "train"
                self.tensorboard.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb is not None:
            grouped = {
                ("eval/" if k.startswith("eval_") else "train/") + k.removeprefix("eval_"): v
                for k, v in values.items()
            }
            self.wandb.log(grouped, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training and eval loss (left), learning rate (middle) and, for preference objectives,
    the rewards and their accuracy (right) against the step, as a PNG; None when there is
    nothing to draw."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    from tunelab.figures import new_figure
    from tunelab.files import save_figure
    from tunelab.loss_curves import Curve, draw_loss, points

    rewards = [r for r in train if "rewards/margins" in r]
    figure = new_figure((15 if rewards else 10, 4))
    axes = figure.subplots(1, 3 if rewards else 2)
    loss_axis, lr_axis = axes[0], axes[1]
    if rewards:  # preference objectives: TRL's reward curves, accuracy on its own scale
        reward_axis = axes[2]
        steps = [r["step"] for r in rewards]
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            reward_axis.plot(steps, [r.get(name) for r in rewards], label=name)
        reward_axis.set(xlabel="optimizer step", ylabel="reward", title="Rewards")
        reward_axis.legend()
        if any("rewards/accuracies" in r for r in rewards):
            accuracy_axis = reward_axis.twinx()
            accuracy_axis.plot(steps, [r.get("rewards/accuracies") for r in rewards], ":",
                               color="black", label="rewards/accuracies")  # fmt: skip
            accuracy_axis.set(ylabel="accuracy", ylim=(0, 1))
    if train:
        lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    eval_curve = Curve("eval", points(evals, "eval_loss"), markers=True)
    draw_loss(loss_axis, [Curve("train", points(train, "loss")), eval_curve])
    loss_axis.set(title="Loss")
    loss_axis.legend()
    lr_axis.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)
