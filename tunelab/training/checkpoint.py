"""Checkpoints a run can resume from exactly: adapter, optimizer, schedule, RNG, data position.

Each checkpoint is written into a temporary folder and renamed into place, so a crash at any
moment leaves the previous checkpoint whole. Only tensors and plain data are stored, and they
load back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically and drop all but the newest ``keep_last``."""
    parent = Path(run_dir) / CHECKPOINTS
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / f"step-{state['step']:06d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        model.save_pretrained(staging)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            staging / "training_state.pt",
        )
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (step, ...)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    blob = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((path / "trainer_state.json").read_text())
