"""Read training data files into raw rows, each with the place it came from."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


@dataclass
class Record:
    """One raw row and where it came from ("data.jsonl:12"), for error messages."""

    row: dict[str, Any]
    origin: str


def load_records(path: str | Path, file_format: str | None = None) -> list[Record]:
    """Read a .jsonl/.json/.csv/.txt file into records (the data stage extends the formats)."""
    path = Path(path)
    if not path.exists():
        raise TunelabError(f"data file {path} does not exist. Check dataset_path / eval_path.")
    fmt = file_format or path.suffix.lstrip(".").lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TunelabError(
            f"{path}: byte {exc.start} is not UTF-8. Re-save the file as UTF-8."
        ) from None
    if not text.strip():
        raise TunelabError(f"{path}: the file is empty. Point dataset_path at a file with data.")
    records: list[Record] = []
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunelabError(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}). "
                    "Each line must be one JSON object."
                ) from None
            records.append(Record(row, f"{path}:{number}"))
    elif fmt == "json":
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
        records = [Record(row, f"{path}[{i}]") for i, row in enumerate(rows)]
    elif fmt in ("csv", "tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if fmt == "tsv" else ",")
        records = [Record(dict(row), f"{path}:{i + 2}") for i, row in enumerate(reader)]
    elif fmt == "txt":
        blocks = [b.strip() for b in text.split("\n\n")]
        records = [Record({"text": b}, f"{path}#{i + 1}") for i, b in enumerate(blocks) if b]
    else:
        raise TunelabError(
            f"{path}: unknown data format '{fmt}'. Use .jsonl, .json, .csv, .tsv or .txt."
        )
    return records
