"""Loaders: every format, detection, and the errors a user sees."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.loading import load_records
from tunelab.errors import TunelabError

ROWS = [
    {"prompt": "What is a byte?", "completion": "Eight bits."},
    {"prompt": "Q2", "completion": "A2"},
]


def rows_of(records):
    return [r.row for r in records]


def test_jsonl_rows_and_origins(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    records = load_records(path)
    assert rows_of(records) == ROWS
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("layout", ["array", "records", "columns"])
def test_json_layouts(tmp_path, layout):
    data = {
        "array": ROWS,
        "records": {"data": ROWS, "version": 1},
        "columns": {
            "prompt": [r["prompt"] for r in ROWS],
            "completion": [r["completion"] for r in ROWS],
        },
    }[layout]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    assert rows_of(load_records(path)) == ROWS


def test_csv_and_tsv_with_quoted_fields(tmp_path):
    (tmp_path / "d.csv").write_text(
        'prompt,completion\n"What is a byte?","Eight bits."\nQ2,"A, 2"\n'
    )
    (tmp_path / "d.tsv").write_text("prompt\tcompletion\nQ1\tA1\n")
    assert rows_of(load_records(tmp_path / "d.csv"))[1] == {"prompt": "Q2", "completion": "A, 2"}
    records = load_records(tmp_path / "d.tsv")
    assert rows_of(records) == [{"prompt": "Q1", "completion": "A1"}] and records[
        0
    ].origin.endswith(":2")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert rows_of(load_records(tmp_path / "d.parquet")) == ROWS


def test_txt_blocks_lines_and_file(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n")
    blocks = load_records(path)
    assert rows_of(blocks) == [{"text": "first doc\nstill first"}, {"text": "second doc"}]
    assert [r.origin for r in blocks] == [f"{path}:1", f"{path}:5"]
    assert len(load_records(path, txt_split="line")) == 3
    assert rows_of(load_records(path, txt_split="file")) == [
        {"text": "first doc\nstill first\n\n\nsecond doc"}
    ]


def test_gzip_and_zstd(tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(text))
    assert rows_of(load_records(tmp_path / "d.jsonl.gz")) == ROWS
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "d.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(b"text\nhello\n"))
    assert rows_of(load_records(tmp_path / "d.csv.zst")) == [{"text": "hello"}]


def test_folder_and_saved_dataset(tmp_path):
    import datasets

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (folder / "b.csv").write_text("prompt,completion\nQ2,A2\n")
    (folder / "README.md").write_text("not data")
    assert rows_of(load_records(folder)) == ROWS
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(saved))
    assert rows_of(load_records(saved)) == ROWS
    assert rows_of(load_records(saved, splits=("validation", "test"))) == ROWS[:1]


def test_format_detected_from_content_and_overridable(tmp_path):
    path = tmp_path / "data"  # no extension
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    assert rows_of(load_records(path)) == ROWS
    array_named_jsonl = tmp_path / "a.jsonl"
    array_named_jsonl.write_text(json.dumps(ROWS, indent=2))
    assert rows_of(load_records(array_named_jsonl)) == ROWS
    assert rows_of(load_records(path, file_format="txt"))[0]["text"].startswith('{"prompt"')


def test_malformed_json_line_names_file_line_and_fix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json}\n")
    with pytest.raises(TunelabError) as err:
        load_records(path)
    assert f"{path}:2" in str(err.value)
    assert "expected one JSON object per line" in str(err.value)
    assert "Fix or delete that line" in str(err.value)


def test_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(TunelabError, match=r"d\.jsonl:2: expected a JSON object.*found list"):
        load_records(path)


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(TunelabError, match=r"d\.jsonl: the file is empty.*point the path"):
        load_records(path)


def test_non_utf8_names_byte_offset_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TunelabError) as err:
        load_records(path)
    message = str(err.value)
    assert (
        f"{path}:2: byte 28 (0xe9) is not UTF-8" in message
        and "Re-save the file as UTF-8" in message
    )


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nQ1,A1\nQ2,A2,extra\n")
    with pytest.raises(
        TunelabError, match=r"d\.csv:3: expected 2 fields \(prompt, completion\), found 3"
    ):
        load_records(path)


def test_missing_path_and_bad_format(tmp_path):
    with pytest.raises(TunelabError, match="does not exist. Check dataset_path"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.jsonl").write_text("{}\n")
    with pytest.raises(TunelabError, match="Did you mean 'jsonl'"):
        load_records(tmp_path / "d.jsonl", file_format="jsnl")


def test_bad_parquet_and_gzip(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(TunelabError, match="not a readable Parquet file"):
        load_records(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(TunelabError, match="not a valid gzip file"):
        load_records(tmp_path / "d.jsonl.gz")


FORMATS = ["d.jsonl", "d.json", "d.csv", "d.tsv", "d.txt", "d.parquet", "d.jsonl.gz", "d"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300), name=st.sampled_from(FORMATS))
def test_arbitrary_bytes_raise_only_tunelab_errors(tmp_path, data, name):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        load_records(path)
    except TunelabError:
        pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=JSON, lines=st.booleans())
def test_arbitrary_json_raises_only_tunelab_errors(tmp_path, value, lines):
    from tunelab.data.schema import to_example

    path = tmp_path / ("d.jsonl" if lines else "d.json")
    path.write_text(json.dumps(value) + "\n")
    try:
        for record in load_records(path):
            to_example(record.row, record.origin)
    except TunelabError:
        pass
