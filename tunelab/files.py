"""Files written so that a crash never leaves a half-written one, and never a surprise full disk.

Every output tunelab writes goes to a temporary file (or folder) in the same folder, is flushed
to disk, and is renamed over the target: a reader sees the old file or the new one, never a torn
one. A full disk met half-way becomes a one-line TunelabError saying how much space is needed;
the readers here name the damaged file instead of failing inside a parser.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

# "No space left on device" from Rust writers (tokenizers, safetensors) arrives as a plain
# Exception whose message is the only trace of the errno
_DISK_FULL_TEXT = (
    "no space left on device",
    "os error 28",
    "disk quota exceeded",
    "database or disk is full",  # SQLite (Optuna's study storage)
)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a full disk or an exceeded quota."""
    seen: BaseException | None = error
    for _ in range(5):  # a short chain: libraries wrap the OSError once or twice
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen).lower() for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


class DiskFullError(TunelabError):
    """Not enough disk space for a write (a TunelabError: the user frees space or moves)."""


def _space_error(folder: Path, needed_bytes: int | None, what: str) -> DiskFullError:
    free = _free_bytes(folder)
    needs = f"needs about {_mib(needed_bytes)} MiB, " if needed_bytes else ""
    return DiskFullError(
        f"not enough disk space for {what} in {folder}: {needs}{_mib(free)} MiB free. Free some "
        "space or choose another folder (output_dir, or TUNELAB_CACHE for the model cache)."
    )


def _mib(size: int | float | None) -> str:
    return f"{(size or 0) / 2**20:,.0f}"


@contextmanager
def disk_full_errors(folder: str | Path, what: str, needed_bytes: int | None = None) -> Iterator:
    """Turn a full disk met inside the block into a TunelabError naming ``what``, the folder,
    the space needed (``needed_bytes``, when known) and the space free."""
    try:
        yield
    except DiskFullError:
        # a write nested inside (one file of a save) is reported as the whole save
        raise _space_error(Path(folder), needed_bytes, what) from None
    except TunelabError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise _space_error(Path(folder), needed_bytes, what) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (a temporary file, fsync, rename);
    a full disk raises TunelabError and leaves any previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_errors(path.parent, path.name, len(data)):
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


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists and tuples) made None, so
    that the JSON written from it is strict JSON (``json.dumps`` writes NaN, which other
    readers refuse) and says "no number" rather than a number that is not one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def json_text(value: Any, **options: Any) -> str:
    """Strict JSON of ``value`` (non-finite floats written as null; see :func:`finite_json`)."""
    return json.dumps(finite_json(value), allow_nan=False, **options)


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json_text(value, indent=2) + "\n")


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
    if _free_bytes(folder) < needed_bytes * 1.1:
        raise _space_error(folder, needed_bytes, what)


def atomic_write_jsonl(path: str | Path, rows: list[Any]) -> Path:
    """One JSON object per line, written whole or not at all."""
    text = "".join(json_text(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    return atomic_write_text(path, text)


def save_figure(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG, written whole or not at all."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def staged_folder(target: str | Path, what: str, needed_bytes: int | None = None) -> Iterator:
    """Yield an empty temporary folder beside ``target``; when the block ends without error its
    files are flushed to disk and the folder renamed to ``target`` (replacing an old one), so
    ``target`` is either whole or absent. On any error the temporary folder is removed, and a
    full disk becomes a TunelabError naming ``what`` and the space needed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if needed_bytes:
        ensure_free_space(target.parent, needed_bytes, what)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        with disk_full_errors(target.parent, what, needed_bytes):
            yield staging
            fsync_tree(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into(staging: str | Path, folder: str | Path, last: tuple[str, ...] = ()) -> None:
    """Rename every file of ``staging`` into ``folder`` (same disk: no copy, no new space),
    the names in ``last`` after the others, so a reader that looks for those names first never
    sees them beside files still being moved; then remove ``staging``."""
    staging, folder = Path(staging), Path(folder)
    others = sorted(p for p in staging.iterdir() if p.name not in last)
    for entry in others + [staging / name for name in last if (staging / name).exists()]:
        destination = folder / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staging.rmdir()


# --- reading what tunelab wrote ---------------------------------------------------------------


def read_json_file(path: str | Path, fix: str) -> Any:
    """The JSON value in ``path``; a cut-off or edited file raises TunelabError naming it and
    ``fix`` (what the user should do), instead of a JSONDecodeError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunelabError(f"{path} is missing. {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TunelabError(
            f"{path} is damaged (not valid JSON: {error}; {path.stat().st_size:,} bytes), so it "
            f"was cut off while being written or edited. {fix}"
        ) from None


def check_safetensors(path: str | Path, fix: str) -> None:
    """Raise TunelabError naming ``path`` when it is missing or not a whole safetensors file
    (its header must parse and its length must cover every tensor the header lists)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path} is missing. {fix}")
    size = path.stat().st_size
    problem = None
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            problem = f"{size} bytes, shorter than a safetensors header"
        else:
            (header_size,) = struct.unpack("<Q", head)
            if header_size > size - 8:
                problem = f"the header claims {header_size:,} bytes, the file has {size:,}"
            else:
                try:
                    header = json.loads(file.read(header_size))
                    ends = [
                        v["data_offsets"][1]
                        for k, v in header.items()
                        if k != "__metadata__" and isinstance(v, dict)
                    ]
                    expected = 8 + header_size + max(ends, default=0)
                    if size < expected:
                        problem = f"{size:,} of {expected:,} bytes"
                except (ValueError, KeyError, IndexError, TypeError):
                    problem = "its header is not valid"
    if problem:
        raise TunelabError(
            f"{path} is damaged ({problem}): it was cut off while being written. {fix}"
        )


def tensor_bytes(model: Any, trainable_only: bool = False) -> int:
    """Bytes a model's (trainable) parameters take when saved."""
    return sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if p.requires_grad or not trainable_only
    )
