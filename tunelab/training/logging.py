"""Metrics as JSON Lines, and a console progress line a person can read."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume, drops lines past the
    checkpoint so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
