"""Metrics as JSON Lines, a console progress line a person can read, and RunLog: what a run
says as it trains."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tunelab.config import FineTuningConfig
from tunelab.files import atomic_write_jsonl, disk_full_errors, json_text
from tunelab.run_folder import CURVES, metrics_path, parse_metrics_file, read_metrics

# the run's console lines (tunelab.messages shows them on stdout; a program can silence them)
LOG = logging.getLogger("tunelab.train")


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume, drops lines past the
    checkpoint so the file reads as one uninterrupted run.

    A line is appended whole or not at all: a full disk met half-way cuts the file back to
    its previous end and raises TunelabError."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            # a line cut off by the crash is past any checkpoint: parse_metrics_file skips it
            kept = [r for r in parse_metrics_file(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_jsonl(self.path, kept)
        elif self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        line = (json_text(record) + "\n").encode()
        with disk_full_errors(self.path.parent, f"a line of {self.path.name}", len(line)):
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                end = os.lseek(descriptor, 0, os.SEEK_END)
                try:
                    written = 0
                    while written < len(line):
                        written += os.write(descriptor, line[written:])
                except BaseException:
                    os.ftruncate(descriptor, end)  # no torn line left for a reader
                    raise
            finally:
                os.close(descriptor)


class Progress:
    """A tqdm bar (loss, tokens/s, ETA) on a terminal; plain lines every log step otherwise."""

    def __init__(self, total: int, initial: int) -> None:
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.interactive,
        )
        self.total = total

    def update(
        self, step: int, loss: float, tokens_per_second: float, lr: float, log_line: bool
    ) -> None:
        if self.interactive:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:.0f}", lr=f"{lr:.2e}", refresh=False
            )
            self.bar.update(1)
        elif log_line:
            LOG.info(
                f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_second:.0f} tok/s  "
                f"lr {lr:.2e}"
            )

    def write(self, text: str) -> None:
        if self.interactive:  # above the live bar, which a log line would tear
            self.bar.write(text)
        else:
            LOG.info(text)

    def close(self) -> None:
        self.bar.close()


def say(is_main: bool, text: str, progress: Progress | None = None) -> None:
    """Print once (from the main process), through the progress bar when there is one."""
    if not is_main:
        return
    if progress is not None:
        progress.write(text)
    else:
        LOG.info(text)


def diverging(
    losses: list[tuple[int, float]],
    grad_norms: list[tuple[int, float]],
    vocab_size: int | None,
    config: FineTuningConfig,
) -> str | None:
    """A warning naming the learning rate when the run diverges (diagnostics.divergence)."""
    from tunelab.diagnostics.divergence import divergence_advice, divergence_evidence

    evidence = divergence_evidence(losses, grad_norms, vocab_size)
    if evidence is None:
        return None
    advice = divergence_advice(config.learning_rate, config.method)
    return f"training is diverging: {evidence}. {advice}"


class RunLog:
    """What a run says: metrics.jsonl and the report_to sinks, the console progress and lines
    (all from the main process only), and the divergence watch.

    Divergence (a loss above the uniform guess or far above its start, an exploded gradient) is
    said once, as soon as it shows, and again in the results' warnings.
    """

    def __init__(
        self,
        run_dir: Path,
        config: FineTuningConfig,
        is_main: bool,
        steps: int,
        step: int,
        resumed: bool,
        vocab_size: int | None,
    ) -> None:
        from tunelab.training.reporting import Reporters

        self.run_dir, self.config, self.is_main = Path(run_dir), config, is_main
        self.steps, self.vocab_size = steps, vocab_size
        self.metrics = self.reporters = self.progress = None
        if is_main:  # only the main process writes files
            path = metrics_path(self.run_dir)
            self.metrics = MetricsLog(path, resume_step=step if resumed else None)
            self.reporters = Reporters(config, self.run_dir, step)
            self.progress = Progress(steps, step)
        self.last_loss = float("nan")  # of the last finite step
        self.losses: list[tuple[int, float]] = []
        self.grad_norms: list[tuple[int, float]] = []
        self.divergence: str | None = None

    def say(self, text: str) -> None:
        say(self.is_main, text, self.progress)

    def warn(self, text: str) -> None:
        """A warning from the main process: on stderr as ``warning: ...`` (above the live bar
        on a terminal, where a log line would tear it)."""
        if not self.is_main:
            return
        if self.progress is not None and self.progress.interactive:
            self.progress.bar.write(f"warning: {text}", file=sys.stderr)
        else:
            LOG.warning(text)

    def record(self, values: dict[str, Any]) -> None:
        if self.metrics is not None and self.reporters is not None:
            self.metrics.write(values)
            self.reporters.write(values)

    def step(
        self,
        step: int,
        epoch: float,
        loss: float,
        grad_norm: float,
        lr: float,
        tokens: int,
        tokens_per_second: float,
        metrics: dict[str, float],
    ) -> None:
        """After optimizer step ``step``: a metrics line every ``logging_steps`` and at the end
        (a non-finite loss or norm written as null), the progress, the divergence watch."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.last_loss = loss
            self.losses.append((step, loss))
            self.grad_norms.append((step, grad_norm))
            if self.divergence is None:
                self.divergence = diverging(
                    self.losses, self.grad_norms, self.vocab_size, self.config
                )
                if self.divergence is not None:
                    self.warn(self.divergence)
        log_now = step % self.config.logging_steps == 0 or step == self.steps
        if log_now:
            self.record(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": round(loss, 6) if finite else None,
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else None,
                    "tokens": tokens,
                    "tokens_per_second": round(tokens_per_second, 2),
                    **{k: round(v, 6) for k, v in metrics.items()},
                }
            )
        if self.progress is not None:
            self.progress.update(step, self.last_loss, tokens_per_second, lr, log_now)

    def warnings(self) -> list[str]:
        """The divergence as the run ended (or as first seen, when it recovered)."""
        if self.divergence is None:
            return []
        final = diverging(self.losses, self.grad_norms, self.vocab_size, self.config)
        return [final or self.divergence]

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def close(self) -> None:
        """Close the progress bar and the sinks; draw the curves when ``config.plot``."""
        from tunelab.training.reporting import plot_curves

        self.close_progress()
        if self.reporters is not None:
            self.reporters.close()
        if self.is_main and self.config.plot:
            plot_curves(read_metrics(self.run_dir), self.run_dir / CURVES)
