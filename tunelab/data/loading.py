"""Read training data files into raw rows, each with the place it came from.

Formats: JSON lines, JSON (an array, one object, or ``{"data": [...]}``-style records), CSV,
TSV, Parquet, plain text, a folder of such files, and a ``datasets`` ``save_to_disk`` folder.
The text formats may be gzip-, zstd-, bzip2- or xz-compressed (``.jsonl.gz``, ``.csv.zst``).
The format comes from the extension, is checked against the content, and can be forced with
``data_format``. Every error names the file and the line or row, and says what to do.

Files are read as streams under ``ReadLimits`` (``max_data_bytes``, ``max_row_bytes``,
``max_rows`` in the config), counted after decompression, so neither ``/dev/zero``, a
decompression bomb nor one endless line can take the machine's memory. A path that is not a
regular file (a FIFO, ``<(...)``, ``/dev/stdin``) can be read only once: ``snapshot_pipes``
copies it, under the same limits, to a private file that hashing and loading both read.
"""

from __future__ import annotations

import bz2
import contextlib
import contextvars
import csv
import gzip
import io
import json
import lzma
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import DATA_FORMATS, TXT_SPLITS
from tunelab.errors import TunelabError, did_you_mean

FORMATS = DATA_FORMATS  # the config's data_format values

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
_COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
# files that sit beside data in a folder but are not data
_NOT_DATA = ("readme", "license", "licence", "copying", "copyright", "changelog", ".")
_CHUNK = 1 << 20
LINES_PER_ROW = 4  # physical lines allowed per row of max_rows (blank lines, multi-line CSV)


@dataclass(frozen=True)
class ReadLimits:
    """How much one data path may hold, counted after decompression (config keys of the same
    names). The defaults suit a laptop; a user with more data raises them."""

    max_data_bytes: int = 1 << 30
    max_row_bytes: int = 16 << 20
    max_rows: int = 1_000_000


class _Budget:
    """Bytes and rows read so far from one data path (a folder shares one budget)."""

    def __init__(self, limits: ReadLimits, path: Path) -> None:
        self.limits, self.path = limits, path
        self.bytes = self.rows = self.lines = 0

    def spend(self, size: int, where: str) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_data_bytes:
            raise TunelabError(
                f"{where}: the data at {self.path} holds more than max_data_bytes "
                f"({self.limits.max_data_bytes:,} bytes after decompression). If that much is "
                "meant, raise it (e.g. --set max_data_bytes=4000000000); otherwise check the "
                "path (a device, a pipe that never ends, or a decompression bomb)."
            )

    def line(self, where: str) -> None:
        # blank lines are not rows but cost a step each: a file of nothing but newlines
        # stops here, not after a gigabyte of empty steps
        self.lines += 1
        if self.lines > LINES_PER_ROW * self.limits.max_rows:
            raise TunelabError(
                f"{where}: the data at {self.path} holds more than {LINES_PER_ROW} x max_rows "
                f"({self.limits.max_rows:,}) lines. If that many are meant, raise max_rows; "
                "otherwise check the path (a device, a pipe or a decompression bomb)."
            )

    def row(self, where: str) -> None:
        self.rows += 1
        if self.rows > self.limits.max_rows:
            raise TunelabError(
                f"{where}: the data at {self.path} holds more than max_rows "
                f"({self.limits.max_rows:,}). If that many rows are meant, raise it (e.g. "
                "--set max_rows=5000000); otherwise check the data."
            )


def _row_too_long(where: str, size: int, limits: ReadLimits) -> TunelabError:
    return TunelabError(
        f"{where}: one row is longer than max_row_bytes ({size:,} bytes > "
        f"{limits.max_row_bytes:,}). Split it into shorter rows, or raise max_row_bytes "
        "(e.g. --set max_row_bytes=100000000) if rows this long are meant."
    )


def _check_row(row: dict[str, Any], where: str, limits: ReadLimits) -> None:
    size = sum(len(v) if isinstance(v, str | bytes) else len(str(v)) for v in row.values())
    if size > limits.max_row_bytes:
        raise _row_too_long(where, size, limits)


@dataclass
class Record:
    """One raw row and where it came from ("data.jsonl:12"), for error messages."""

    row: dict[str, Any]
    origin: str


# --- paths that can be read only once ---------------------------------------------------------

# path as the user gave it -> the private copy that stands for it while a snapshot is open
_SNAPSHOTS: contextvars.ContextVar[dict[str, Path] | None] = contextvars.ContextVar(
    "tunelab_data_snapshots", default=None
)


def _snapshots() -> dict[str, Path]:
    return _SNAPSHOTS.get() or {}


def is_regular(path: Path) -> bool:
    """A regular file or a folder: a path that reads the same bytes every time."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


@contextlib.contextmanager
def snapshot_pipes(paths: Iterable[str | Path | None], limits: ReadLimits) -> Iterator[None]:
    """While open, every path of ``paths`` that is not a regular file or folder (a FIFO,
    ``/dev/fd/63`` from ``<(...)``, a device) is read once, under ``limits``, into a private
    temporary file, and ``load_records``/``data_files`` read that copy: a pipe is never read
    twice, and the cache key hashes the bytes actually read. Nested uses share the copies."""
    known = dict(_snapshots())
    pending = [
        Path(p)
        for p in paths
        if p and str(p) not in known and Path(p).exists() and not is_regular(Path(p))
    ]
    if not pending:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tunelab-data-") as scratch:
        for index, path in enumerate(pending):
            target = Path(scratch) / str(index) / (path.name or "data")
            target.parent.mkdir()
            _copy_once(path, target, limits)
            known[str(path)] = target
        token = _SNAPSHOTS.set(known)
        try:
            yield
        finally:
            _SNAPSHOTS.reset(token)


def _copy_once(path: Path, target: Path, limits: ReadLimits) -> None:
    """Copy a pipe or device under max_data_bytes; uncompressed text also under max_row_bytes
    (so ``/dev/zero`` stops after one row's worth instead of a gigabyte)."""
    budget, run, text, lines = _Budget(limits, path), 0, None, 0
    with open(path, "rb") as source, open(target, "wb") as sink:
        while block := source.read(_CHUNK):
            if text is None:
                text = _compression(block[:6]) is None and not block.startswith(b"PAR1")
            budget.spend(len(block), str(path))
            if text:
                last = block.rfind(b"\n")
                run = run + len(block) if last < 0 else len(block) - last - 1
                lines += block.count(b"\n")
                if run > limits.max_row_bytes:
                    raise _row_too_long(f"{path}:{lines + 1}", run, limits)
            sink.write(block)


def _readable(path: Path) -> Path:
    """The file to read for ``path``: its snapshot while one is open, else itself."""
    return _snapshots().get(str(path), path)


# --- the entry points --------------------------------------------------------------------------


def load_records(
    path: str | Path,
    file_format: str | None = None,
    txt_split: str = "blank_line",
    splits: tuple[str, ...] = ("train",),
    limits: ReadLimits | None = None,
) -> list[Record]:
    """Every row of a data file or folder, in order, with its origin.

    ``file_format`` forces the format (one of ``FORMATS``); ``txt_split`` says what one text
    document is (``blank_line`` blocks, each ``line``, or the whole ``file``); ``splits`` are
    the split names tried, in order, in a ``datasets`` folder that holds several; ``limits``
    caps bytes, row size and rows (a ``TunelabError`` naming the key to raise when exceeded).
    """
    path = Path(path)
    limits = limits or ReadLimits()
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
    budget = _Budget(limits, path)
    if path.is_dir():
        if file_format == "arrow" or _is_saved_dataset(path):
            with _out_of_memory(path, limits):
                return _load_saved_dataset(path, splits, budget)
        return _load_folder(path, file_format, txt_split, budget)
    if not is_regular(path) and str(path) not in _snapshots():
        with snapshot_pipes([path], limits):
            return _load_file(path, file_format, txt_split, budget)
    return _load_file(path, file_format, txt_split, budget)


def data_files(path: str | Path) -> list[Path]:
    """The files that make up a data path (for hashing): the file, or every file of a folder.
    A pipe under ``snapshot_pipes`` gives its private copy; outside one, it is refused, since
    hashing would consume what loading then reads."""
    path = Path(path)
    if str(path) in _snapshots():
        return [_readable(path)]
    if path.is_file():
        return [path]
    if path.exists() and not path.is_dir():
        raise TunelabError(
            f"{path} is not a regular file (a pipe or device): open it with snapshot_pipes "
            "before hashing it."
        )
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


def _load_folder(
    folder: Path, file_format: str | None, txt_split: str, budget: _Budget
) -> list[Record]:
    files = _folder_data_files(folder)
    if not files:
        raise TunelabError(
            f"folder {folder} holds no data files. Expected files ending in "
            f"{', '.join(sorted(_SUFFIXES))} (optionally {'/'.join(_COMPRESSIONS)}), or a "
            "folder written by datasets' save_to_disk."
        )
    records: list[Record] = []
    for file in files:
        records.extend(_load_file(file, file_format, txt_split, budget))
    return records


def _load_saved_dataset(folder: Path, splits: tuple[str, ...], budget: _Budget) -> list[Record]:
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
    # the arrow files are memory-mapped: check their size before turning rows into objects
    budget.spend(loaded.data.nbytes, where)
    records = []
    for i, row in enumerate(loaded):
        budget.row(f"{where}#{i}")
        _check_row(row, f"{where}#{i}", budget.limits)
        records.append(Record(dict(row), f"{where}#{i}"))
    return records


def _format_from_name(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


# --- streams -----------------------------------------------------------------------------------


def _compression(head: bytes, name: str = "") -> str | None:
    name = name.lower()
    if name.endswith(".gz") or head[:2] == b"\x1f\x8b":
        return "gzip"
    if name.endswith((".zst", ".zstd")) or head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if name.endswith(".bz2") or head[:3] == b"BZh":
        return "bzip2"
    if name.endswith(".xz") or head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


_FIX = {
    "gzip": "Re-compress it with gzip, or remove the .gz ending if it is not compressed.",
    "zstd": "Re-compress it with zstd.",
    "bzip2": "Re-compress it with bzip2.",
    "xz": "Re-compress it with xz.",
}


@contextlib.contextmanager
def _open_stream(path: Path) -> Iterator[tuple[io.BufferedIOBase, str | None]]:
    """The decompressed bytes of ``path`` as a buffered stream, and the compression's name."""
    with open(_readable(path), "rb") as raw:
        kind = _compression(raw.read(6), path.name)
        raw.seek(0)
        if kind is None:
            yield raw, None
            return
        if kind == "gzip":
            stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw)
        elif kind == "bzip2":
            stream = bz2.BZ2File(raw)
        elif kind == "xz":
            stream = lzma.LZMAFile(raw)
        else:
            try:
                import zstandard
            except ImportError:
                raise TunelabError(
                    f"{path}: is zstd-compressed, which needs the 'zstandard' package. Install "
                    "it with: pip install zstandard (or decompress the file with 'zstd -d')."
                ) from None
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        with stream:
            yield stream, kind


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, lzma.LZMAError]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


def _bad_compression(path: Path, kind: str, exc: BaseException) -> TunelabError:
    return TunelabError(f"{path}: not a valid {kind} file ({exc}). {_FIX[kind]}")


def _lines(path: Path, budget: _Budget) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, each read under max_row_bytes and counted against
    max_data_bytes; errors name the line."""
    limit = budget.limits.max_row_bytes
    with _open_stream(path) as (stream, kind):
        number, offset = 0, 0
        while True:
            try:
                line = stream.readline(limit + 1)
            except _read_errors() as exc:
                if kind is None:
                    raise
                raise _bad_compression(path, kind, exc) from None
            if not line:
                return
            number += 1
            where = f"{path}:{number}"
            if len(line) > limit and not line.endswith(b"\n"):
                raise _row_too_long(where, len(line), budget.limits)
            budget.spend(len(line), where)
            budget.line(where)
            yield number, _decode_line(path, number, offset, line)
            offset += len(line)


def _decode_line(path: Path, number: int, offset: int, line: bytes) -> str:
    if number == 1 and line.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TunelabError(
            f"{path}: is UTF-16 text; tunelab reads UTF-8. Re-save the file as UTF-8."
        )
    try:
        return line.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise TunelabError(
            f"{path}:{number}: byte {offset + exc.start} (0x{line[exc.start]:02x}) is not UTF-8; "
            "expected UTF-8 text. Re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _read_all(path: Path, budget: _Budget) -> bytes:
    """The whole decompressed content (for JSON and compressed Parquet), under max_data_bytes."""
    chunks = []
    with _open_stream(path) as (stream, kind):
        try:
            while block := stream.read(_CHUNK):
                budget.spend(len(block), str(path))
                chunks.append(block)
        except _read_errors() as exc:
            if kind is None:
                raise
            raise _bad_compression(path, kind, exc) from None
    return b"".join(chunks)


def _first_line(path: Path, limits: ReadLimits) -> str | None:
    """The start of the first non-blank line (at most max_row_bytes, for telling formats
    apart; a one-line JSON file may be longer), or None for an empty file."""
    budget = _Budget(limits, path)
    with _open_stream(path) as (stream, kind):
        while True:
            try:
                line = stream.readline(limits.max_row_bytes + 1)
            except _read_errors() as exc:
                if kind is None:
                    raise
                raise _bad_compression(path, kind, exc) from None
            if not line:
                return None
            budget.spend(len(line), str(path))
            budget.line(str(path))
            if line.strip():
                if line.startswith((b"\xff\xfe", b"\xfe\xff")):
                    _decode_line(path, 1, 0, line)  # raises: UTF-16
                return line.decode("utf-8-sig", errors="replace")


def _sniff(first: str) -> str:
    """The format the first line looks like, for files whose name does not say."""
    start = first.lstrip()[:1]
    if start in ("[", "{"):
        try:
            json.loads(first)
            return "jsonl"
        except json.JSONDecodeError:
            return "json"
    if "\t" in first:
        return "tsv"
    if "," in first:
        return "csv"
    return "txt"


def _load_file(
    path: Path, file_format: str | None, txt_split: str, budget: _Budget
) -> list[Record]:
    with _out_of_memory(path, budget.limits):
        return _read_file(path, file_format, txt_split, budget)


@contextlib.contextmanager
def _out_of_memory(path: Path, limits: ReadLimits) -> Iterator[None]:
    """A MemoryError while reading becomes an error that names the file and the limits: the
    limits allow more than this machine (or its memory cap) can hold."""
    try:
        yield
    except MemoryError:
        raise TunelabError(
            f"{path}: ran out of memory reading the data, within the limits max_data_bytes "
            f"({limits.max_data_bytes:,}), max_row_bytes ({limits.max_row_bytes:,}) and "
            f"max_rows ({limits.max_rows:,}). Lower them to what this machine can hold (e.g. "
            "--set max_data_bytes=500000000), or split the data into smaller files."
        ) from None


def _read_file(
    path: Path, file_format: str | None, txt_split: str, budget: _Budget
) -> list[Record]:
    fmt = file_format or _format_from_name(path)
    if fmt == "arrow":
        raise TunelabError(
            f"{path}: data_format 'arrow' means a datasets save_to_disk folder; point the path "
            "at that folder."
        )
    with open(_readable(path), "rb") as handle:
        raw_head = handle.read(4)
    if fmt == "parquet" or (fmt is None and raw_head == b"PAR1"):
        return _load_parquet(path, budget)
    with _open_stream(path) as (stream, _):
        try:
            head = stream.read(4)
        except _read_errors():
            head = b""  # the full read below names the damage
    if head == b"PAR1":
        return _load_parquet(path, budget, _read_all(path, budget))
    first = _first_line(path, budget.limits)
    if first is None:
        raise TunelabError(
            f"{path}: the file is empty. Expected training rows; point the path at a file with "
            "data or remove this one."
        )
    if fmt is None:
        fmt = _sniff(first)
    if fmt == "jsonl" and first.lstrip()[:1] == "[":  # a JSON array saved under a .jsonl name
        fmt = "json"
    if fmt == "jsonl":
        records = _load_jsonl(path, _lines(path, budget), budget)
    elif fmt == "json":
        records = _load_json(path, budget)
    elif fmt in ("csv", "tsv"):
        records = _load_csv(path, budget, "\t" if fmt == "tsv" else ",")
    else:
        records = _load_txt(path, budget, txt_split)
    if not records:
        raise TunelabError(
            f"{path}: holds no rows (only blank lines or a header). Add data or remove the file."
        )
    return records


def _need_object(row: Any, origin: str, hint: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise TunelabError(
            f'{origin}: expected a JSON object with named fields (e.g. {{"text": ...}}), found '
            f"{type(row).__name__} {json.dumps(row)[:60]}. {hint}"
        )
    return row


def _load_jsonl(path: Path, lines: Iterable[tuple[int, str]], budget: _Budget) -> list[Record]:
    records = []
    for number, line in lines:
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
        budget.row(origin)
        records.append(Record(_need_object(row, origin, "Each line must be one object."), origin))
    return records


def _load_json(path: Path, budget: _Budget) -> list[Record]:
    data = _read_all(path, budget)
    text = _decode_line(path, 1, 0, data)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        if _looks_like_json_lines(text):
            lines = list(enumerate(text.split("\n"), start=1))
            for number, line in lines:
                if len(line) > budget.limits.max_row_bytes:
                    raise _row_too_long(f"{path}:{number}", len(line), budget.limits) from None
            return _load_jsonl(path, lines, budget)
        raise TunelabError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); expected a "
            "JSON array of objects (or JSON lines, one object per line). Fix the file."
        ) from None
    except RecursionError:
        raise TunelabError(f"{path}: JSON nested too deeply to read.") from None
    del data, text
    if isinstance(parsed, dict):
        lists = [k for k, v in parsed.items() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in parsed[lists[0]]):
            rows, where = parsed[lists[0]], f"{path}[{lists[0]}]"  # {"data": [...]}
        elif _is_columns(parsed):
            columns = list(parsed)
            rows = [
                dict(zip(columns, values, strict=True))
                for values in zip(*parsed.values(), strict=True)
            ]
            where = str(path)
        else:
            rows, where = [parsed], str(path)
    elif isinstance(parsed, list):
        rows, where = parsed, str(path)
    else:
        raise TunelabError(
            f"{path}: expected a JSON array of objects, found a bare {type(parsed).__name__}. "
            "Wrap the rows in [...]."
        )
    hint = "The array must hold objects."
    records = []
    for i, row in enumerate(rows):
        origin = f"{where}[{i}]"
        budget.row(origin)
        _check_row(_need_object(row, origin, hint), origin, budget.limits)
        records.append(Record(row, origin))
    return records


def _looks_like_json_lines(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
        return False
    try:
        json.loads(lines[0])
        return True
    except json.JSONDecodeError:
        return False


def _is_columns(data: dict[str, Any]) -> bool:
    """``{"prompt": [...], "completion": [...]}``: columns of equal length (pandas 'list')."""
    values = list(data.values())
    return (
        len(values) > 1
        and all(isinstance(v, list) for v in values)
        and len({len(v) for v in values}) == 1
    )


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    # csv's own field limit (128 KiB by default) is process-wide; set ours for this read only
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _load_csv(path: Path, budget: _Budget, delimiter: str) -> list[Record]:
    name = "TSV" if delimiter == "\t" else "CSV"
    physical = (line for _, line in _lines(path, budget))
    reader = csv.reader(physical, delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records = []
    previous = 0
    with _csv_field_limit(budget.limits.max_row_bytes):
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                if "field larger than field limit" in str(exc):
                    raise _row_too_long(
                        f"{path}:{previous + 1}", budget.limits.max_row_bytes + 1, budget.limits
                    ) from None
                raise TunelabError(
                    f"{path}:{previous + 1}: not valid {name} ({exc}). Quote fields that "
                    "contain the delimiter, quotes or line breaks."
                ) from None
            line, previous = previous + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                if len(set(header)) != len(header) or not all(header):
                    raise TunelabError(
                        f"{path}:{line}: the header row should name every column once, found "
                        f"{header}. Fix the header line."
                    )
                continue
            if len(row) != len(header):
                raise TunelabError(
                    f"{path}:{line}: expected {len(header)} fields ({', '.join(header)}), found "
                    f"{len(row)}. Quote fields that contain '{delimiter}' or fix the row."
                )
            budget.row(f"{path}:{line}")
            records.append(Record(dict(zip(header, row, strict=True)), f"{path}:{line}"))
    return records


# rows decoded at once from Parquet: a batch of rows each under max_row_bytes stays under this
_PARQUET_BATCH_BYTES = 128 << 20


def _load_parquet(path: Path, budget: _Budget, data: bytes | None = None) -> list[Record]:
    """Rows of a Parquet file, decoded a few at a time: each batch's decoded size is counted
    against max_data_bytes and each row against max_row_bytes before it becomes Python objects,
    since a file of a few hundred bytes can decode to gigabytes (repeated values compress to
    nothing) and the footer's sizes are the writer's claim, not the truth."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    limits = budget.limits
    batch_rows = max(1, min(1024, _PARQUET_BATCH_BYTES // max(1, limits.max_row_bytes)))
    records: list[Record] = []
    try:
        parquet = pq.ParquetFile(io.BytesIO(data) if data is not None else _readable(path))
        meta = parquet.metadata
        # the footer's counts refuse an honest oversized file before any decoding
        if budget.rows + meta.num_rows > limits.max_rows:
            budget.rows += meta.num_rows - 1
            budget.row(f"{path}#{meta.num_rows - 1}")  # raises, naming max_rows
        claimed = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if budget.bytes + claimed > limits.max_data_bytes:
            budget.spend(claimed, str(path))  # raises, naming max_data_bytes
        for batch in parquet.iter_batches(batch_size=batch_rows, use_threads=False):
            origins = [f"{path}#{len(records) + i}" for i in range(batch.num_rows)]
            for where, size in zip(origins, _parquet_row_sizes(batch), strict=True):
                budget.row(where)
                if size > limits.max_row_bytes:
                    raise _row_too_long(where, size, limits)
                budget.spend(size, where)
            # every row is checked, in decoded bytes, before any becomes Python objects
            records.extend(map(Record, batch.to_pylist(), origins))
            del batch
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, MemoryError):  # pyarrow's ArrowMemoryError is one
            raise
        raise TunelabError(
            f"{path}: not a readable Parquet file ({exc}). Write it again (e.g. with "
            "pandas' to_parquet or datasets' to_parquet)."
        ) from None
    return records


def _parquet_row_sizes(batch: Any) -> list[int]:
    """The decoded size of every row of an Arrow record batch: string and binary values by
    length, other columns by the Arrow bytes each row references."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sizes = [0] * batch.num_rows
    for column in batch.columns:
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                pa.types.is_large_binary)  # fmt: skip
        if any(is_text(column.type) for is_text in text):
            lengths = pc.binary_length(column).fill_null(0).to_pylist()
        elif pa.types.is_primitive(column.type):  # numbers, booleans, dates: a fixed width
            lengths = [max(1, column.type.bit_width // 8)] * len(column)
        else:
            lengths = [column.slice(i, 1).nbytes for i in range(len(column))]
        sizes = [a + b for a, b in zip(sizes, lengths, strict=True)]
    return sizes


def _load_txt(path: Path, budget: _Budget, txt_split: str) -> list[Record]:
    if txt_split not in TXT_SPLITS:
        raise TunelabError(
            f"txt_split {txt_split!r} is not supported; use one of {', '.join(TXT_SPLITS)}."
        )
    limit = budget.limits.max_row_bytes
    records: list[Record] = []
    block: list[str] = []
    start, size = 0, 0

    def close() -> None:
        text = "\n".join(block).strip()
        if text:
            origin = str(path) if txt_split == "file" else f"{path}:{start}"
            budget.row(origin)
            records.append(Record({"text": text}, origin))

    for number, line in _lines(path, budget):
        line = line.removesuffix("\n").removesuffix("\r")
        separator = txt_split == "line" or (txt_split == "blank_line" and not line)
        if separator:
            close()
            block, size = [], 0
            if txt_split == "blank_line":
                continue
        if not block:
            start = number
        block.append(line)
        size += len(line) + 1
        if size > limit:  # one document (a block, or the whole file) too long
            raise _row_too_long(
                str(path) if txt_split == "file" else f"{path}:{start}", size, budget.limits
            )
    close()
    return records
