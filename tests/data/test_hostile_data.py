"""Data that would exhaust the machine: devices, decompression bombs, endless lines, pipes.

The memory cases run in a subprocess under RLIMIT_AS (2 GiB; importing torch, transformers and
tunelab takes about 0.7 GiB of address space here) and must end in a TunelabError naming the
config key to raise, long before the cap.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tunelab.config import FineTuningConfig
from tunelab.data.loading import ReadLimits, load_records
from tunelab.data.prepare import prepare_examples
from tunelab.errors import TunelabError

ROOT = Path(__file__).resolve().parents[2]
MEMORY_CAP = 2 << 30


def run_capped(code: str, tmp_path: Path) -> str:
    """Run ``code`` under the memory cap; it prints one line: OK <message> or RAW <type>."""
    body = textwrap.indent(textwrap.dedent(code), "    ")
    script = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))\n"
        "import torch, transformers  # what a real run has loaded before the data\n"
        "from tunelab.errors import TunelabError\n"
        "try:\n"
        f"{body}\n"
        "    print('NO ERROR')\n"
        "except TunelabError as exc:\n"
        "    status = open('/proc/self/status').read()\n"
        "    peak = int(status.split('VmPeak:')[1].split()[0]) << 10\n"
        "    print('OK', peak, exc)\n"
        "except BaseException as exc:\n"
        "    print('RAW', type(exc).__name__, exc)\n"
    )
    # pyarrow's default allocator (mimalloc) reserves 1 GiB of address space on first use, which
    # RLIMIT_AS counts though it is never touched; the system allocator counts what is used
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARROW_DEFAULT_MEMORY_POOL": "system"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.split(" ", 1)[0] in
             ("OK", "RAW", "NO")]  # fmt: skip
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return lines[-1]


def assert_named_error(result: str, *words: str) -> None:
    assert result.startswith("OK "), result
    _, peak, message = result.split(" ", 2)
    assert int(peak) < MEMORY_CAP * 0.75, f"peak {int(peak) >> 20} MiB: {message}"
    for word in words:
        assert word in message, message


def bomb(path: Path, member: bytes, copies: int, compress) -> Path:
    """A compressed file expanding to ``copies`` x ``member``: gzip, zstd, bzip2 and xz all
    read concatenated members/frames/streams as one, so one small member repeated does it."""
    path.write_bytes(compress(member) * copies)
    return path


def prepare_code(path: Path, **settings) -> str:
    values = {"dataset_path": str(path), "data_cache": False, **settings}
    return (
        "from tunelab.config import FineTuningConfig\n"
        "from tunelab.data.prepare import prepare_examples\n"
        f"prepare_examples(FineTuningConfig(**{values!r}))\n"
    )


def test_dev_zero_stops_at_max_row_bytes(tmp_path):
    result = run_capped(prepare_code(Path("/dev/zero")), tmp_path)
    assert_named_error(result, "/dev/zero:1", "max_row_bytes")


@pytest.mark.parametrize("kind", ["gz", "zst", "bz2", "xz"])
def test_decompression_bomb_of_one_endless_line(tmp_path, kind):
    compress = {
        "gz": lambda b: gzip.compress(b, 1),
        "zst": lambda b: pytest.importorskip("zstandard").ZstdCompressor().compress(b),
        "bz2": bz2.compress,
        "xz": lzma.compress,
    }[kind]
    # 3 GiB of 'a' with no line break, from a file of a few MB
    path = bomb(tmp_path / f"d.jsonl.{kind}", b"a" * (64 << 20), 48, compress)
    assert path.stat().st_size < 40 << 20
    result = run_capped(prepare_code(path), tmp_path)
    assert_named_error(result, f"d.jsonl.{kind}:1", "max_row_bytes")


def test_gzip_bomb_of_blank_lines_stops_at_the_line_cap(tmp_path):
    path = bomb(tmp_path / "d.txt.gz", b"\n" * (64 << 20), 48, lambda b: gzip.compress(b, 1))
    result = run_capped(prepare_code(path), tmp_path)
    assert_named_error(result, "d.txt.gz", "max_rows")


def test_gzip_bomb_of_small_rows_stops_at_max_rows(tmp_path):
    row = b'{"text": "a short row of text"}\n'
    path = bomb(tmp_path / "d.jsonl.gz", row * (2 << 20), 48, lambda b: gzip.compress(b, 1))
    result = run_capped(prepare_code(path), tmp_path)
    assert_named_error(result, "d.jsonl.gz", "max_rows")


def test_gzip_bomb_of_long_rows_stops_at_max_data_bytes(tmp_path):
    row = b'{"text": "' + b"word " * 200_000 + b'"}\n'  # 1 MB rows
    path = bomb(tmp_path / "d.jsonl.gz", row * 64, 48, lambda b: gzip.compress(b, 1))
    code = prepare_code(path, max_data_bytes=256 << 20)
    assert_named_error(run_capped(code, tmp_path), "d.jsonl.gz", "max_data_bytes")


def test_one_huge_jsonl_line_names_file_line_and_key(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as handle:
        handle.write('{"text": "fine"}\n{"text": "' + "x" * (40 << 20) + '"}\n')
    with pytest.raises(TunelabError) as err:
        load_records(path)
    message = str(err.value)
    assert f"{path}:2" in message and "max_row_bytes" in message and "16,777,216" in message


def test_a_user_can_raise_the_limits(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "' + "x" * 3000 + '"}\n' * 1)
    with pytest.raises(TunelabError, match="max_row_bytes"):
        load_records(path, limits=ReadLimits(max_row_bytes=1000))
    assert len(load_records(path, limits=ReadLimits(max_row_bytes=4000))) == 1
    with pytest.raises(TunelabError, match="positive"):
        FineTuningConfig(dataset_path=str(path), max_rows=0)


@pytest.mark.parametrize(
    "name, content, where",
    [
        ("d.csv", 'text\n"' + "x" * 5000 + '"\n', "d.csv:2"),
        ("d.tsv", "text\n" + "x" * 5000 + "\n", "d.tsv:2"),
        ("d.txt", ("x" * 100 + "\n") * 60, "d.txt:1"),  # one blank_line block
        ("d.json", json.dumps([{"text": "ok"}, {"text": "x" * 5000}]), "d.json[1]"),
    ],
    ids=["csv", "tsv", "txt", "json"],
)
def test_every_text_format_caps_one_row(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TunelabError) as err:
        load_records(path, limits=ReadLimits(max_row_bytes=4000))
    assert where in str(err.value) and "max_row_bytes" in str(err.value)


def test_parquet_and_saved_dataset_check_rows_before_reading(tmp_path):
    import datasets

    rows = datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(10)])
    rows.to_parquet(str(tmp_path / "d.parquet"))
    rows.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        with pytest.raises(TunelabError, match="max_rows"):
            load_records(path, limits=ReadLimits(max_rows=5))
        assert len(load_records(path, limits=ReadLimits(max_rows=10))) == 10


def parquet_bomb(path: Path, rows: int, size: int, *, arrow_schema: bool) -> Path:
    """A Parquet file of a few hundred bytes whose ``rows`` rows each hold ``size`` bytes once
    decoded: one dictionary value repeated, zstd-compressed. Without the stored Arrow schema it
    reads back as plain strings; with it, as a dictionary column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    value = pa.array(["a" * size], pa.large_string())
    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), value)
    pq.write_table(pa.table({"text": column}), path, compression="zstd", store_schema=arrow_schema)
    return path


@pytest.mark.parametrize("arrow_schema", [False, True], ids=["strings", "dictionary"])
def test_parquet_decompression_bomb_stops_at_max_data_bytes(tmp_path, arrow_schema):
    # 40 rows of 40 MB (1.6 GB decoded) in a file of under a kilobyte; the rows read are kept,
    # so max_data_bytes is lowered (as for the gzip bomb) to leave the cap room for them
    path = parquet_bomb(tmp_path / "h.parquet", 40, 40 << 20, arrow_schema=arrow_schema)
    assert path.stat().st_size < 4096
    code = prepare_code(path, max_row_bytes=64 << 20, max_data_bytes=256 << 20)
    assert_named_error(run_capped(code, tmp_path), "h.parquet#", "max_data_bytes")


def test_parquet_rows_are_checked_before_they_become_python(tmp_path):
    path = parquet_bomb(tmp_path / "h.parquet", 3, 5000, arrow_schema=True)
    with pytest.raises(TunelabError) as err:
        load_records(path, limits=ReadLimits(max_row_bytes=4000))
    assert f"{path}#0" in str(err.value) and "max_row_bytes" in str(err.value)
    with pytest.raises(TunelabError, match=r"h\.parquet#2: the data at .* max_data_bytes"):
        load_records(path, limits=ReadLimits(max_data_bytes=12_000))
    assert len(load_records(path, limits=ReadLimits(max_data_bytes=15_000))) == 3


def test_running_out_of_memory_names_the_file_and_the_limits(tmp_path, monkeypatch):
    import tunelab.data.loading as loading

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n')

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(loading, "_load_jsonl", exhausted)
    with pytest.raises(TunelabError) as err:
        load_records(path)
    message = str(err.value)
    assert str(path) in message and "max_data_bytes" in message and "max_row_bytes" in message


def test_a_folder_shares_one_byte_budget(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"text": "' + "x" * 600 + '"}\n')
    assert len(load_records(tmp_path, limits=ReadLimits(max_data_bytes=1300))) == 2
    with pytest.raises(TunelabError, match=r"b\.jsonl:1: the data at .* max_data_bytes"):
        load_records(tmp_path, limits=ReadLimits(max_data_bytes=1000))


def test_bz2_and_xz_files_load(tmp_path):
    (tmp_path / "d.jsonl.bz2").write_bytes(bz2.compress(b'{"text": "from bzip2"}\n'))
    (tmp_path / "e.csv.xz").write_bytes(lzma.compress(b"text\nfrom xz\n"))
    assert load_records(tmp_path / "d.jsonl.bz2")[0].row == {"text": "from bzip2"}
    assert load_records(tmp_path / "e.csv.xz")[0].row == {"text": "from xz"}


def test_a_long_row_gets_a_warning(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"text": "word " * 20_000}) + "\n" + json.dumps({"text": "short"}) + "\n"
    )
    prepare_examples(FineTuningConfig(dataset_path=str(path), data_cache=False, max_length=512))
    err = capsys.readouterr().err
    assert "warning: 1 row(s) longer than 16,384 characters" in err and f"{path}:1" in err


# --- paths that can be read only once ---------------------------------------------------------


def serve(path: Path, content: bytes) -> threading.Thread:
    """Write ``content`` into the FIFO ``path`` once, from a thread (the reader blocks)."""

    def write() -> None:
        with open(path, "wb") as handle:
            handle.write(content)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def within(seconds: float, call):
    """``call()``'s result, failing (not hanging) when it blocks: a second read of a FIFO
    waits forever for a writer that already left."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still blocked after {seconds} s (the pipe was read twice?)"
    return result[0]


def rows(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def test_a_fifo_is_read_once_and_never_answered_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    config = FineTuningConfig(dataset_path=str(fifo), data_cache=True, dedup_near_threshold=None)
    serve(fifo, rows("first content, one", "first content, two"))
    first = within(60, lambda: prepare_examples(config))
    assert [e.text for e in first.train] == ["first content, one", "first content, two"]
    assert first.manifest["inputs"]["train"][0]["path"] == str(fifo)
    serve(fifo, rows("second content"))
    second = within(60, lambda: prepare_examples(config))
    assert [e.text for e in second.train] == ["second content"]
    assert not second.manifest["cache_hit"]
    serve(fifo, rows("first content, one", "first content, two"))
    assert within(60, lambda: prepare_examples(config)).manifest["cache_hit"]  # same bytes


def test_a_process_substitution_path_is_read_once(tmp_path):
    read, write = os.pipe()
    os.write(write, rows("through a pipe"))
    os.close(write)
    path = f"/dev/fd/{read}"
    try:
        records = load_records(path)
    finally:
        os.close(read)
    assert [r.row["text"] for r in records] == ["through a pipe"]
    assert records[0].origin == f"{path}:1"


def test_the_eval_loader_reads_a_fifo_eval_path_once(tmp_path):
    from tunelab.evaluation.run import load_items

    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(4))
    )
    fifo = tmp_path / "eval.jsonl"
    os.mkfifo(fifo)
    serve(fifo, b'{"prompt": "What is a byte?", "completion": "Eight bits."}\n')
    config = FineTuningConfig(dataset_path=str(train), data_cache=False)
    held_out, pool = within(60, lambda: load_items(config, str(fifo), None))
    assert [item.reference for item in held_out] == ["Eight bits."] and len(pool) == 4
    assert held_out[0].terms  # the raw reference was read too, from the same copy
