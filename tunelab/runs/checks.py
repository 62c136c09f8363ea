"""Whether a saved run or model folder is whole: every file tunelab wrote parses and has the
size it was written with, before generate, merge, export or evaluate load it."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.files import check_safetensors, read_json_file
from tunelab.run_folder import ADAPTER_CONFIG, CONFIG, damaged_run_fix, read_saved_config


def check_run_files(folder: str | Path) -> None:
    """Raise TunelabError naming the first damaged or missing file of a saved run or model
    folder: every top-level .json must parse, every .safetensors must be whole, the saved
    tunelab_config.yaml must parse, and an adapter folder must hold its weights and tokenizer.
    """
    folder = Path(folder)
    fix = damaged_run_fix(folder)
    for path in sorted(folder.glob("*.json")):
        read_json_file(path, fix)
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path, fix)
    read_saved_config(folder)
    _check_recorded_sizes(folder, fix)
    if (folder / ADAPTER_CONFIG).is_file():
        weights = ("adapter_model.safetensors", "adapter_model.bin")
        if not any((folder / name).is_file() for name in weights):
            raise TunelabError(f"{folder / weights[0]} is missing. {fix}")
        if not (folder / "tokenizer_config.json").is_file():
            raise TunelabError(f"{folder / 'tokenizer_config.json'} is missing. {fix}")


# The saved files whose size the manifest vouches for: those a cut can leave still readable (the
# saved config cut at a line boundary loses its last keys, and defaults would silently stand in
# for them; a tokenizer's text files; weights). A .json file is not here: a cut one no longer
# parses (named above), and a whole one of another size is an edit users make on purpose
# (adapter_config.json repointed at a moved base, a chat template fixed in tokenizer_config).
# metrics.jsonl is not either: a resumed run appends to it.
_SIZE_CHECKED = (
    CONFIG, "*.safetensors", "*.bin", "tokenizer.model", "merges.txt", "vocab.txt",
    "chat_template.jinja",
)  # fmt: skip


def _check_recorded_sizes(folder: Path, fix: str) -> None:
    """Raise TunelabError naming a top-level file whose size differs from what the folder's
    complete manifest recorded when tunelab wrote it."""
    from tunelab.ownership import read_manifest

    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete", False):
        return  # a run from before manifests, or one still being written: nothing recorded
    for name, size in sorted(manifest["files"].items()):
        if "/" in name or not any(fnmatch.fnmatch(name, p) for p in _SIZE_CHECKED):
            continue
        path = folder / name
        try:
            actual = path.lstat().st_size
        except OSError:
            continue  # a missing file is named by the checks that need it
        if isinstance(size, int) and actual != size:
            raise TunelabError(
                f"{path} is {actual} bytes but tunelab wrote {size}: it was cut off or edited. "
                f"{fix}"
            )


def resolve_run_dir(target: str | Path) -> tuple[Path, Any]:
    """The run folder and its config, from a run folder or the config file that made it."""
    from tunelab.config import load_config

    path = Path(target)
    if path.is_file():
        config = load_config(path)
        run_dir = Path(config.output_dir)
        if not (run_dir / ADAPTER_CONFIG).is_file():
            raise TunelabError(
                f"{path} trains into {run_dir}, which holds no finished run (no "
                f"{ADAPTER_CONFIG}). Run 'tunelab train {path}' first."
            )
        check_run_files(run_dir)
        return run_dir, config
    if (path / CONFIG).is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise TunelabError(
            f"{path} is a tunelab run that did not finish: no saved adapter ({ADAPTER_CONFIG})"
            f". Its training stopped or its final save failed; 'tunelab doctor {path}' shows why."
        )
    if not (path / ADAPTER_CONFIG).is_file() or not (path / CONFIG).is_file():
        raise TunelabError(
            f"{path} is not a tunelab run folder (expected {ADAPTER_CONFIG} and "
            f"{CONFIG} in it). Pass the output_dir of a finished 'tunelab train', or "
            "its config file."
        )
    check_run_files(path)  # a save cut off by a full disk is named, not parsed
    return path, load_config(path / CONFIG)
