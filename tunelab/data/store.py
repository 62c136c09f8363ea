"""Prepared data and its storage: the cache folder, the processed dataset with its manifest,
and the one-line summary that ``tunelab train`` prints.

``PreparedData`` lives here, not in ``prepare``, so that the stage imports its store and the
store never imports the stage (no import cycle)."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.schema import Example
from tunelab.files import atomic_write_jsonl, atomic_write_text, disk_full_errors


@dataclass
class PreparedData:
    """Training and held-out examples, plus what was done to get them."""

    train: list[Example]
    eval: list[Example] | None
    manifest: dict[str, Any] = field(default_factory=dict)


# --- cache ----------------------------------------------------------------------------------


def _example_row(example: Example) -> dict[str, Any]:
    return {"origin": example.origin, **example.to_row(), "meta": example.meta}


def _from_row(row: dict[str, Any]) -> Example:
    return Example(
        row["origin"],
        text=row.get("text"),
        prompt=row.get("prompt"),
        completion=row.get("completion"),
        messages=row.get("messages"),
        meta=row.get("meta") or {},
        tools=row.get("tools"),
    )


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_jsonl(path, rows)  # whole or not at all; a full disk is a TunelabError


def write_cache(folder: Path, prepared: PreparedData) -> None:
    # write beside, then rename: a crash mid-write never leaves a half cache that looks whole
    partial = folder.with_name(folder.name + f".partial-{random.randrange(1 << 30)}")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        with disk_full_errors(folder.parent, "the data cache"):
            _write_jsonl(partial / "train.jsonl", [_example_row(e) for e in prepared.train])
            if prepared.eval is not None:
                _write_jsonl(partial / "eval.jsonl", [_example_row(e) for e in prepared.eval])
            atomic_write_text(
                partial / "manifest.json", json.dumps(prepared.manifest, indent=1, default=str)
            )
        partial.rename(folder)
    except OSError:  # another run cached the same content first
        pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def read_cache(folder: Path) -> PreparedData | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        train = [
            _from_row(json.loads(line))
            for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        eval_file = folder / "eval.jsonl"
        held_out = (
            [_from_row(json.loads(line)) for line in eval_file.read_text("utf-8").splitlines()]
            if eval_file.exists()
            else None
        )
    except (OSError, ValueError, KeyError):
        return None  # no cache, or a damaged one: prepare again
    manifest["cache_hit"] = True
    return PreparedData(train, held_out, manifest)


# --- outputs --------------------------------------------------------------------------------


def write_prepared(prepared: PreparedData, folder: str | Path) -> list[Path]:
    """The processed dataset (train.jsonl, eval.jsonl) in a standard schema plus manifest.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "train.jsonl"]
    _write_jsonl(written[0], [e.to_row() for e in prepared.train])
    if prepared.eval is not None:
        written.append(folder / "eval.jsonl")
        _write_jsonl(written[-1], [e.to_row() for e in prepared.eval])
    written.append(folder / "manifest.json")
    atomic_write_text(written[-1], json.dumps(prepared.manifest, indent=1, default=str) + "\n")
    return written


def format_summary(manifest: dict[str, Any]) -> str:
    """One or two lines for ``tunelab train``: counts, drops by reason, PII, leakage, cache."""
    counts = manifest.get("counts", {})
    parts = [
        f"Data: {counts.get('train_loaded', '?')} rows loaded -> "
        f"{counts.get('train', '?')} training examples"
    ]
    if counts.get("eval"):
        source = "held out by eval_split" if counts.get("eval_from_split") else "eval"
        parts[0] += f", {counts['eval']} {source}"
    dropped = manifest.get("dropped", {})
    for split in ("train", "eval"):
        reasons = dropped.get(split) or {}
        if reasons:
            listed = ", ".join(
                f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])
            )
            parts.append(f"dropped from {split}: {listed}")
    masked = sum(s.get("masked", 0) for s in manifest.get("steps", []) if s["kind"] == "mask")
    if masked:
        parts.append(f"{masked} empty assistant turns left out of the loss")
    pii = {
        k: v
        for split in ("train", "eval")
        for k, v in (manifest.get("pii", {}).get(split) or {}).items()
    }
    if pii:
        verb = "redacted" if manifest["pii"].get("redacted") else "found (not redacted)"
        parts.append(f"PII {verb}: " + ", ".join(f"{n} {kind}" for kind, n in pii.items()))
    leakage = manifest.get("leakage")
    if leakage and (leakage["exact"] or leakage["near"]):
        parts.append(
            f"eval leakage: {leakage['exact']} exact, {leakage['near']} near"
            + (
                f" ({leakage['dropped']} dropped)"
                if leakage["dropped"]
                else " (kept; set drop_eval_leaks)"
            )
        )
    if manifest.get("mix"):
        from tunelab.data.mixing import describe_mix

        parts.append(describe_mix(manifest["mix"]))
    bias_section = manifest.get("bias") or {}
    if bias_section.get("added"):
        parts.append(f"bias {bias_section['mitigation']}: +{bias_section['added']} examples")
    train_lengths = (manifest.get("lengths") or {}).get("train") or {}
    if train_lengths.get("truncated"):
        parts.append(
            f"{train_lengths['truncated']} truncated at max_length {train_lengths['max_length']}"
        )
    parts.append(
        "from cache"
        if manifest.get("cache_hit")
        else f"prepared in {manifest.get('seconds', 0):.1f} s"
    )
    return "; ".join(parts) + "."
