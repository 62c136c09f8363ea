"""Files written so that a crash never leaves a half-written one, and never a surprise full disk.

Every output tunelab writes goes to a temporary file in the same folder, is flushed to disk,
and is renamed over the target: a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def fsync_tree(folder: str | Path) -> None:
    """Flush every file of a folder written by a library (e.g. save_pretrained) to disk."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                os.fsync(file.fileno())


def ensure_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Fail before writing ``what`` when the disk holding ``folder`` lacks ``needed_bytes``
    (plus a 10% margin), so a full disk never interrupts a write half-way."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.1:
        raise TunelabError(
            f"not enough disk space for {what} in {folder}: needs about "
            f"{needed_bytes / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free. Free some space or "
            "choose another folder (output_dir, or TUNELAB_CACHE for the model cache)."
        )


def tensor_bytes(model: Any, trainable_only: bool = False) -> int:
    """Bytes a model's (trainable) parameters take when saved."""
    return sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if p.requires_grad or not trainable_only
    )
