"""Metrics as JSON Lines, and a console progress line a person can read."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tunelab.files import atomic_write_jsonl, disk_full_errors
from tunelab.run_folder import parse_metrics_file


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
        line = (json.dumps(record) + "\n").encode()
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
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_second:.0f} tok/s  "
                f"lr {lr:.2e}",
                flush=True,
            )

    def write(self, text: str) -> None:
        if self.interactive:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()
