"""What tunelab may delete or replace: only files it can prove it wrote.

Every folder tunelab writes (a run, a merged model, prepared data, reports) holds a manifest,
``.tunelab-manifest.json``, naming the kind of output and each file tunelab wrote there with its
size. ``--overwrite`` removes exactly those files and refuses, naming them, when the folder holds
anything else; a file tunelab did not write is never replaced. Outputs are also kept apart from
inputs: an output can never be an input or contain one.

Folders written before manifests existed (and runs interrupted before their manifest was
completed) are recognised by the names tunelab writes for that kind of output, nothing more; a
folder without a manifest counts as an old run only when its saved config and metrics read as
tunelab writes them. A listed file whose size differs from the manifest's was changed after
tunelab wrote it (the user edited it), so it is no longer tunelab's either.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.run_folder import (
    ADAPTER_CONFIG,
    CHECKPOINTS,
    CONFIG,
    CURVES,
    DATA_MANIFEST,
    EVAL_PREFERENCE_FILES,
    EVAL_REPORT_FILES,
    METRICS,
    RESULTS,
    RUN_INFO,
    STOP_REQUEST,
    read_saved_config,
)

logger = logging.getLogger(__name__)

MANIFEST = ".tunelab-manifest.json"
MANIFEST_FORMAT = 1

# The names each kind of output holds, for folders whose manifest is missing (written before
# manifests) or incomplete (interrupted): a run, a merged model, prepared data.
_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", RUN_INFO, CONFIG,
)  # fmt: skip

# README.md is not among them: tunelab writes none, and a project's README is the user's.
KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    "run": _MODEL_FILES
    + (
        f"{CHECKPOINTS}/*",
        METRICS,
        CURVES,
        RESULTS,
        DATA_MANIFEST,
        "adapter_model.safetensors",
        ADAPTER_CONFIG,
        *EVAL_REPORT_FILES,
        *EVAL_PREFERENCE_FILES,
        "*.gguf",
        ".*.partial",
        STOP_REQUEST,
        "tensorboard/*",
        "mlruns/*",
    ),  # fmt: skip
    "merge": _MODEL_FILES,
    "data": ("train.jsonl", "eval.jsonl", "manifest.json"),
    # a converted GGUF model in tunelab's cache (models.convert_gguf)
    "model-cache": _MODEL_FILES + ("SOURCE.txt",),
}


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none (or an unreadable one: then nothing in
    the folder is provably tunelab's)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def _files_in(folder: Path) -> list[str]:
    """Every file (and symlink) below ``folder`` as a relative POSIX path, manifest excluded."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            relative = (base / name).relative_to(folder).as_posix()
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def _matches_known(relative: str, kind: str) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in KNOWN_NAMES.get(kind, ()))


def _recorded(folder: Path, files: dict[str, Any], prefix: str = "") -> dict[str, bool]:
    """Each manifest entry (as ``prefix``/name), and whether the file is still the size tunelab
    recorded; one that differs was edited (or replaced) since, and is no longer tunelab's."""
    still = {}
    for relative, size in files.items():
        try:
            same = (folder / relative).lstat().st_size == size
        except OSError:
            same = False  # gone: nothing to delete
        still[f"{prefix}{relative}"] = same
    return still


def _holds_saved_config(folder: Path) -> bool:
    """Whether ``folder``'s tunelab_config.yaml is one tunelab saved: a mapping of config keys
    (a user's file of that name, or a stray line, is not)."""
    try:
        config = read_saved_config(folder)
    except (OSError, TunelabError):
        return False
    return isinstance(config, dict) and "model_name" in config


def _first_record(path: Path) -> Any:
    """The first line of a JSON-lines file, parsed (None when it has none or is not JSON)."""
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    return json.loads(line)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return None


def folder_kind(folder: str | Path) -> str | None:
    """The kind of tunelab output a folder holds ('run', 'merge', 'data', ...), or None."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        return str(manifest.get("kind"))
    # a run written before manifests: tunelab saved its config first, then a checkpoint's
    # state or, at the end, run_info.json; a lone tunelab_config.yaml or checkpoints/ is not
    # enough (a user's project may hold either), nor are files that merely bear those names:
    # the config must read as one tunelab saved, and metrics.jsonl as tunelab's step records
    if not (folder / CONFIG).is_file() or not _holds_saved_config(folder):
        return None
    metrics = folder / METRICS
    if metrics.is_file():
        record = _first_record(metrics)
        return "run" if isinstance(record, dict) and "step" in record else None
    if any(folder.glob(f"{CHECKPOINTS}/*/trainer_state.json")):
        return "run"
    # a merged model: merge copies the run's config and run_info.json next to the weights
    if (folder / RUN_INFO).is_file() and (folder / "config.json").is_file():
        return "merge"
    return None


def split_owned(folder: str | Path, kind: str) -> tuple[list[str], list[str]]:
    """(files tunelab wrote, other files) in ``folder``, for an output of ``kind``.

    A file is tunelab's when the manifest lists it with the size it still has, or, for a folder
    without a complete manifest, when its name is one tunelab writes for that kind. A subfolder
    with a manifest of its own (e.g. prepared data inside a run) answers for its own files.
    Everything else (a user's file, a listed file the user has since edited) is "other".
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    by_name = manifest is None or not manifest.get("complete", False)
    if manifest is None and folder_kind(folder) != kind and kind != "model-cache":
        # a folder that is not a tunelab output of this kind owns nothing (tunelab's own cache
        # folders, named by tunelab, are the exception)
        by_name = False
    recorded = _nested_recorded(folder)
    if manifest is not None:
        recorded.update(_recorded(folder, manifest["files"]))
    owned: list[str] = []
    other: list[str] = []
    for relative in _files_in(folder):
        if relative in recorded:  # a listed file is judged by its size, never by its name
            mine = recorded[relative]
        else:
            mine = by_name and _matches_known(relative, kind)
        (owned if mine else other).append(relative)
    return owned, other


def _nested_recorded(folder: Path) -> dict[str, bool]:
    """What the manifests of ``folder``'s subfolders list (see ``_recorded``), with those
    manifests themselves."""
    recorded: dict[str, bool] = {}
    for manifest_path in folder.rglob(MANIFEST):
        sub = manifest_path.parent
        if sub == folder:
            continue
        manifest = read_manifest(sub)
        if manifest is None:
            continue
        prefix = sub.relative_to(folder).as_posix()
        recorded[f"{prefix}/{MANIFEST}"] = True
        recorded.update(_recorded(sub, manifest["files"], f"{prefix}/"))
    return recorded


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prepare_output_folder(
    folder: str | Path,
    kind: str,
    overwrite: bool,
    what: str,
    option: str = "--overwrite",
    hint: str = "",
) -> Path:
    """Make ``folder`` ready for a new output of ``kind`` (a 'run', 'merge', 'data' folder).

    A missing or empty folder is created. A non-empty one is refused unless ``overwrite``;
    then only the files tunelab wrote there for ``kind`` are removed, and a folder holding
    anything else is refused with those files named. ``what`` names the folder in messages
    (e.g. 'output_dir'); ``hint`` adds another way out to the refusal. The folder's manifest
    is started (incomplete). Raises TunelabError.

    A command that can still fail after choosing its folder (reading its data, loading a
    model) calls ``check_output_folder`` first and this only once those have passed, so a
    refused command never costs the old output.
    """
    folder = Path(folder)
    owned = check_output_folder(folder, kind, overwrite, what, option, hint)
    if owned:
        logger.info("Replacing %d file(s) tunelab wrote in %s.", len(owned), folder)
        remove_owned(folder, owned)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, kind, {}, complete=False)
    return folder


def check_output_folder(
    folder: str | Path,
    kind: str,
    overwrite: bool,
    what: str,
    option: str = "--overwrite",
    hint: str = "",
) -> list[str]:
    """The refusals of ``prepare_output_folder``, deleting and creating nothing: returns the
    files tunelab wrote in ``folder`` that ``overwrite`` will replace (none for a missing or
    empty folder). Raises TunelabError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TunelabError(
            f"{what} {folder} is a file, not a folder. Choose a folder path for {what}."
        )
    present = _files_in(folder) if folder.is_dir() else []
    if not present:  # a folder holding only a manifest is an output that wrote nothing yet
        return []
    current = folder_kind(folder)
    if current is not None and current != kind:
        raise TunelabError(
            f"{what} {folder} holds a tunelab {current} output, not a {kind}; tunelab will "
            f"not replace it with a {kind}. Choose another folder for {what}."
        )
    owned, other = split_owned(folder, kind)
    if not overwrite:
        raise TunelabError(
            f"{what} {folder} is not empty (it holds {_listing(present) or MANIFEST}). Pass "
            f"{option} to replace the {len(owned)} file(s) tunelab wrote there{hint}, or "
            "choose another folder."
        )
    if other:
        raise TunelabError(
            f"{what} {folder} holds files tunelab did not write ({_listing(other)}), so "
            f"{option} will not delete it. Move those files out, or choose another folder."
        )
    return owned


def remove_owned(folder: Path, owned: Iterable[str]) -> None:
    """Delete the listed files (relative to ``folder``), then the folders they leave empty."""
    parents: set[Path] = set()
    for relative in owned:
        path = folder / relative
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():  # a symlink-free folder listed whole (never from a user's tree)
            shutil.rmtree(path)
        parents.update(p for p in path.parents if folder in p.parents)
    (folder / MANIFEST).unlink(missing_ok=True)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def write_manifest(
    folder: str | Path, kind: str, files: dict[str, int], complete: bool = True
) -> Path:
    """Write ``folder``'s manifest: the output ``kind`` and ``files`` (relative path -> bytes)."""
    from tunelab.files import atomic_write_json

    manifest = {
        "tunelab_manifest": MANIFEST_FORMAT,
        "kind": kind,
        "complete": complete,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": dict(sorted(files.items())),
    }
    return atomic_write_json(Path(folder) / MANIFEST, manifest)


def foreign_files(folder: str | Path, kind: str) -> list[str]:
    """The files in ``folder`` that tunelab did not write (kept out of the manifest later)."""
    return split_owned(folder, kind)[1] if Path(folder).is_dir() else []


def finish_output_folder(folder: str | Path, kind: str, foreign: Iterable[str] = ()) -> Path:
    """Record every file now in ``folder`` as tunelab's, except ``foreign`` (files that were
    there before the command and are not tunelab's), and mark the manifest complete."""
    folder = Path(folder)
    keep_out = set(foreign)
    files = {
        relative: (folder / relative).lstat().st_size
        for relative in _files_in(folder)
        if relative not in keep_out
    }
    return write_manifest(folder, kind, files)


def record_files(folder: str | Path, kind: str, paths: Iterable[str | Path]) -> Path:
    """Add files tunelab just wrote into ``folder`` to its manifest (creating one if needed),
    keeping what the manifest listed before."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = dict(manifest["files"]) if manifest else {}
    for path in paths:
        relative = Path(path).resolve().relative_to(folder.resolve()).as_posix()
        files[relative] = (folder / relative).lstat().st_size
    if manifest is not None:
        kind, complete = str(manifest.get("kind")), bool(manifest.get("complete", True))
    else:
        # a run written before manifests stays a run, still recognised by its file names
        legacy = folder_kind(folder)
        kind, complete = (legacy, False) if legacy else (kind, True)
    return write_manifest(folder, kind, files, complete=complete)


def check_output_files(
    folder: str | Path, names: Iterable[str], what: str, announce: bool = True
) -> None:
    """Refuse to replace a file in ``folder`` that tunelab did not write; say which of its own
    files will be replaced. ``names`` are relative to ``folder``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    recorded = _recorded(folder, manifest["files"]) if manifest else {}
    legacy_run = manifest is None and folder_kind(folder) == "run"
    replaced, refused = [], []
    for name in names:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        if recorded.get(name) or (legacy_run and _matches_known(name, "run")):
            replaced.append(name)
        else:
            refused.append(name)
    if refused:
        raise TunelabError(
            f"{what}: {folder} already holds {_listing(refused)}, which tunelab did not write, "
            "so it will not replace them. Move them, or choose another folder (--out)."
        )
    if replaced and announce:
        logger.info("Replacing %s in %s (written by tunelab earlier).", _listing(replaced), folder)


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_separate(output: str | Path, inputs: Mapping[str, str | Path | None], what: str) -> None:
    """Refuse an output that is one of the inputs or contains one (deleting or rewriting it
    would destroy the input), and an output inside an input folder (the data stage would read
    it back). ``inputs`` maps a name for the message (e.g. 'dataset_path') to a path; names
    that are not local paths (hub ids) are ignored."""
    out = _resolved(output)
    for name, value in inputs.items():
        if not value:
            continue
        source = _resolved(value)
        if not source.exists():
            continue
        if out == source or out in source.parents:
            raise TunelabError(
                f"{what} {output} {'is' if out == source else 'contains'} the input {name} "
                f"({value}): writing there would overwrite it. Choose another folder for {what}."
            )
        if source.is_dir() and source in out.parents:
            raise TunelabError(
                f"{what} {output} lies inside the input {name} ({value}), so tunelab would "
                f"write into its input. Choose a folder outside {value} for {what}."
            )
