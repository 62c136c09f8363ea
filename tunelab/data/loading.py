"""Read training data files into raw rows, each with the place it came from.

Formats: JSON lines, JSON (an array, one object, or ``{"data": [...]}``-style records), CSV,
TSV, Parquet, plain text, a folder of such files, and a ``datasets`` ``save_to_disk`` folder.
The text formats may be gzip- or zstd-compressed (``.jsonl.gz``, ``.csv.zst``). The format
comes from the extension, is checked against the content, and can be forced with
``data_format``. Every error names the file and the line or row, and says what to do.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError, did_you_mean

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "txt", "arrow")
TXT_SPLITS = ("blank_line", "line", "file")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
}
_COMPRESSIONS = (".gz", ".zst", ".zstd")
# files that sit beside data in a folder but are not data
_NOT_DATA = ("readme", "license", "licence", "copying", "copyright", "changelog", ".")


@dataclass
class Record:
    """One raw row and where it came from ("data.jsonl:12"), for error messages."""

    row: dict[str, Any]
    origin: str


def load_records(
    path: str | Path,
    file_format: str | None = None,
    txt_split: str = "blank_line",
    splits: tuple[str, ...] = ("train",),
) -> list[Record]:
    """Every row of a data file or folder, in order, with its origin.

    ``file_format`` forces the format (one of ``FORMATS``); ``txt_split`` says what one text
    document is (``blank_line`` blocks, each ``line``, or the whole ``file``); ``splits`` are
    the split names tried, in order, in a ``datasets`` folder that holds several.
    """
    path = Path(path)
    if file_format is not None and file_format not in FORMATS:
        raise TunelabError(
            f"data_format {file_format!r} is not supported; use one of "
            f"{', '.join(FORMATS)}.{did_you_mean(file_format, FORMATS)}"
        )
    if not path.exists():
        raise TunelabError(
            f"data path {path} does not exist. Check dataset_path / eval_path (relative paths "
            "in a config file are read from the config's folder)."
        )
    if path.is_dir():
        if file_format == "arrow" or _is_saved_dataset(path):
            return _load_saved_dataset(path, splits)
        return _load_folder(path, file_format, txt_split)
    return _load_file(path, file_format, txt_split)


def data_files(path: str | Path) -> list[Path]:
    """The files that make up a data path (for hashing): the file, or every file of a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return _folder_data_files(path)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def _folder_data_files(folder: Path) -> list[Path]:
    files = []
    for file in sorted(folder.rglob("*")):
        name = file.name.lower()
        if not file.is_file() or name.startswith(_NOT_DATA):
            continue
        if _format_from_name(file) is not None:
            files.append(file)
    return files


def _load_folder(folder: Path, file_format: str | None, txt_split: str) -> list[Record]:
    files = _folder_data_files(folder)
    if not files:
        raise TunelabError(
            f"folder {folder} holds no data files. Expected files ending in "
            f"{', '.join(sorted(_SUFFIXES))} (optionally .gz/.zst), or a folder written by "
            "datasets' save_to_disk."
        )
    records: list[Record] = []
    for file in files:
        records.extend(_load_file(file, file_format, txt_split))
    return records


def _load_saved_dataset(folder: Path, splits: tuple[str, ...]) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise TunelabError(
            f"{folder}: looks like a datasets save_to_disk folder but cannot be read ({exc}). "
            "Save it again with Dataset.save_to_disk."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = next((s for s in splits if s in loaded), names[0] if len(names) == 1 else None)
        if chosen is None:
            raise TunelabError(
                f"{folder}: holds the splits {', '.join(names)}, none of which is "
                f"{' or '.join(splits)}. Save the split you want on its own folder."
            )
        loaded, where = loaded[chosen], f"{folder}[{chosen}]"
    else:
        where = str(folder)
    return [Record(dict(row), f"{where}#{i}") for i, row in enumerate(loaded)]


def _format_from_name(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name.lower()
    if name.endswith(".gz") or data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise TunelabError(
                f"{path}: not a valid gzip file ({exc}). Re-compress it with gzip, or remove "
                "the .gz ending if it is not compressed."
            ) from None
    if name.endswith((".zst", ".zstd")) or data[:4] == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise TunelabError(
                f"{path}: is zstd-compressed, which needs the 'zstandard' package. Install it "
                "with: pip install zstandard (or decompress the file with 'zstd -d')."
            ) from None
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                return reader.read()
        except zstandard.ZstdError as exc:
            raise TunelabError(
                f"{path}: not a valid zstd file ({exc}). Re-compress it with zstd."
            ) from None
    return data


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TunelabError(
            f"{path}: is UTF-16 text; tunelab reads UTF-8. Re-save the file as UTF-8."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TunelabError(
            f"{path}:{line}: byte {exc.start} (0x{data[exc.start]:02x}) is not UTF-8; expected "
            "UTF-8 text. Re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _sniff(text: str) -> str:
    """The format the content looks like, for files whose name does not say."""
    start = text.lstrip()[:1]
    if start in ("[", "{"):
        first = text.lstrip().split("\n", 1)[0]
        try:
            json.loads(first)
            return "jsonl"
        except json.JSONDecodeError:
            return "json"
    header = text.split("\n", 1)[0]
    if "\t" in header:
        return "tsv"
    if "," in header:
        return "csv"
    return "txt"


def _load_file(path: Path, file_format: str | None, txt_split: str) -> list[Record]:
    fmt = file_format or _format_from_name(path)
    if fmt == "arrow":
        raise TunelabError(
            f"{path}: data_format 'arrow' means a datasets save_to_disk folder; point the path "
            "at that folder."
        )
    if fmt == "parquet" or (fmt is None and path.read_bytes()[:4] == b"PAR1"):
        return _load_parquet(path)
    data = _read_bytes(path)
    if data[:4] == b"PAR1":
        return _load_parquet(path, data)
    text = _decode(path, data)
    if not text.strip():
        raise TunelabError(
            f"{path}: the file is empty. Expected training rows; point the path at a file with "
            "data or remove this one."
        )
    if fmt is None:
        fmt = _sniff(text)
    if fmt == "jsonl":
        first = text.lstrip()[:1]
        if first == "[":  # a JSON array saved under a .jsonl name
            fmt = "json"
    elif fmt == "json" and _looks_like_json_lines(text):
        fmt = "jsonl"
    if fmt == "jsonl":
        records = _load_jsonl(path, text)
    elif fmt == "json":
        records = _load_json(path, text)
    elif fmt in ("csv", "tsv"):
        records = _load_csv(path, text, "\t" if fmt == "tsv" else ",")
    else:
        records = _load_txt(path, text, txt_split)
    if not records:
        raise TunelabError(
            f"{path}: holds no rows (only blank lines or a header). Add data or remove the file."
        )
    return records


def _looks_like_json_lines(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
        return False
    try:
        json.loads(text)
        return False
    except json.JSONDecodeError:
        pass
    try:
        json.loads(lines[0])
        return True
    except json.JSONDecodeError:
        return False


def _need_object(row: Any, origin: str, hint: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise TunelabError(
            f'{origin}: expected a JSON object with named fields (e.g. {{"text": ...}}), found '
            f"{type(row).__name__} {json.dumps(row)[:60]}. {hint}"
        )
    return row


def _load_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TunelabError(
                f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); expected "
                f"one JSON object per line, found {line.strip()[:60]!r}. Fix or delete that line."
            ) from None
        except RecursionError:
            raise TunelabError(f"{path}:{number}: JSON nested too deeply to read.") from None
        origin = f"{path}:{number}"
        records.append(Record(_need_object(row, origin, "Each line must be one object."), origin))
    return records


def _load_json(path: Path, text: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TunelabError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); expected a "
            "JSON array of objects (or JSON lines, one object per line). Fix the file."
        ) from None
    except RecursionError:
        raise TunelabError(f"{path}: JSON nested too deeply to read.") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in data[lists[0]]):
            rows, where = data[lists[0]], f"{path}[{lists[0]}]"  # {"data": [...]}
        elif _is_columns(data):
            columns = list(data)
            rows = [
                dict(zip(columns, values, strict=True))
                for values in zip(*data.values(), strict=True)
            ]
            where = str(path)
        else:
            rows, where = [data], str(path)
    elif isinstance(data, list):
        rows, where = data, str(path)
    else:
        raise TunelabError(
            f"{path}: expected a JSON array of objects, found a bare {type(data).__name__}. "
            "Wrap the rows in [...]."
        )
    hint = "The array must hold objects."
    return [
        Record(_need_object(row, f"{where}[{i}]", hint), f"{where}[{i}]")
        for i, row in enumerate(rows)
    ]


def _is_columns(data: dict[str, Any]) -> bool:
    """``{"prompt": [...], "completion": [...]}``: columns of equal length (pandas 'list')."""
    values = list(data.values())
    return (
        len(values) > 1
        and all(isinstance(v, list) for v in values)
        and len({len(v) for v in values}) == 1
    )


def _load_csv(path: Path, text: str, delimiter: str) -> list[Record]:
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise TunelabError(
            f"{path}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({exc}). Quote "
            "fields that contain the delimiter, quotes or line breaks."
        ) from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header) or not all(header):
        raise TunelabError(
            f"{path}:1: the header row should name every column once, found {header}. Fix the "
            "header line."
        )
    records = []
    # csv does not give line numbers per row once read; count physical lines instead
    line_numbers = _row_line_numbers(text, delimiter)
    for index, row in enumerate(rows[1:], start=1):
        line = line_numbers[index] if index < len(line_numbers) else index + 1
        if len(row) != len(header):
            raise TunelabError(
                f"{path}:{line}: expected {len(header)} fields ({', '.join(header)}), found "
                f"{len(row)}. Quote fields that contain '{delimiter}' or fix the row."
            )
        records.append(Record(dict(zip(header, row, strict=True)), f"{path}:{line}"))
    return records


def _row_line_numbers(text: str, delimiter: str) -> list[int]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    numbers, previous = [], 0
    for row in reader:
        if any(cell.strip() for cell in row):
            numbers.append(previous + 1)
        previous = reader.line_num
    return numbers


def _load_parquet(path: Path, data: bytes | None = None) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data) if data is not None else path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TunelabError(
            f"{path}: not a readable Parquet file ({exc}). Write it again (e.g. with "
            "pandas' to_parquet or datasets' to_parquet)."
        ) from None
    return [Record(row, f"{path}#{i}") for i, row in enumerate(table.to_pylist())]


def _load_txt(path: Path, text: str, txt_split: str) -> list[Record]:
    if txt_split not in TXT_SPLITS:
        raise TunelabError(
            f"txt_split {txt_split!r} is not supported; use one of {', '.join(TXT_SPLITS)}."
        )
    text = text.replace("\r\n", "\n")
    if txt_split == "file":
        return [Record({"text": text.strip()}, str(path))] if text.strip() else []
    records, line = [], 1
    separator = "\n" if txt_split == "line" else "\n\n"
    for block in text.split(separator):
        if block.strip():
            start = line + len(block) - len(block.lstrip("\n"))
            records.append(Record({"text": block.strip()}, f"{path}:{start}"))
        line += block.count("\n") + separator.count("\n")
    return records
