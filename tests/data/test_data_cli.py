"""`tunelab data inspect | prepare | preview` through argparse, as the main CLI wires them."""

from __future__ import annotations

import argparse
import json

from tests.conftest import write_jsonl
from tunelab.data.cli import add_data_commands, render_loss_spans


def run(argv):
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def make_config(tmp_path, tiny_model_dir, qa_rows):
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": f"What does {r['term']} mean?", "completion": r["definition"]}
            for r in qa_rows
        ],
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name: {tiny_model_dir}\ndataset_path: train.jsonl\noutput_dir: out\n"
        "max_length: 64\n"
    )
    return config


def test_inspect_a_bare_path(tmp_path, qa_rows, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "<script>x</script> hi there"}] * 2)
    assert (
        run(
            [
                "data",
                "inspect",
                str(path),
                "--out",
                str(tmp_path / "rep"),
                "--set",
                "strip_html=false",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 rows loaded -> 1 training examples" in out and "1 exact duplicate" in out
    assert "&lt;script&gt;" in (tmp_path / "rep" / "report.html").read_text()


def test_prepare_writes_dataset_and_manifest(
    tmp_path, tiny_model_dir, qa_rows, capsys, monkeypatch
):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    config = make_config(tmp_path, tiny_model_dir, qa_rows)
    assert run(["data", "prepare", str(config), "--set", "eval_split=0.2"]) == 0
    out_dir = tmp_path / "out" / "data"
    assert len((out_dir / "train.jsonl").read_text().splitlines()) == 5
    assert len((out_dir / "eval.jsonl").read_text().splitlines()) == 1
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["counts"]["eval_from_split"] == 1 and manifest["tokenizer"]
    assert "Wrote" in capsys.readouterr().out


def test_preview_marks_loss_tokens(tmp_path, tiny_model_dir, qa_rows, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    config = make_config(tmp_path, tiny_model_dir, qa_rows)
    assert run(["data", "preview", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    # chat template: the user turn is outside the loss, the answer and its end tag inside
    assert "<|im_start|>user\nWhat does compiler mean?<|im_end|>" in out
    assert "[[A program that translates source code into machine code.<|im_end|>" in out


def test_render_loss_spans_colour():
    class Tok:
        def decode(self, ids):
            return "".join(chr(96 + i) for i in ids)

    assert render_loss_spans(Tok(), [1, 2, 3], [-100, 2, 3], colour=False) == "a[[bc]]"
    assert render_loss_spans(Tok(), [1, 2], [-100, 2], colour=True) == "a\033[42;30mb\033[0m"


def test_preview_shows_the_boundary_token_of_a_prompt_ending_in_a_space(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Define: ", "completion": "byte"}])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name: {tiny_model_dir}\ndataset_path: train.jsonl\nchat_format: plain\n"
    )
    assert run(["data", "preview", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "Define:[[ byte<|im_end|>]]" in out and "2 in the loss" in out


def test_a_preference_config_is_inspected_as_training_reads_it(tmp_path, tiny_model_dir, capsys):
    # `tunelab data inspect` on a kto config refused its label: false rows as bad SFT data
    # ("train this file with objective: kto", which it did), and on a dpo config named its
    # pairs an unknown schema; prepare and preview failed the same way
    import pytest

    from tunelab.errors import TunelabError

    rows = [
        {"prompt": f"What is term {i}?", "completion": f"answer {i} to it", "label": i < 2}
        for i in range(8)
    ]
    write_jsonl(tmp_path / "kto.jsonl", rows)
    config = tmp_path / "kto.yaml"
    config.write_text(
        f"model_name: {tiny_model_dir}\ndataset_path: {tmp_path / 'kto.jsonl'}\n"
        f"output_dir: {tmp_path / 'out'}\nobjective: kto\neval_split: 0.0\n"
    )
    assert run(["data", "inspect", str(config), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "KTO rows: 2 desirable (true), 6 undesirable (false)." in printed
    assert "Set desirable_weight between 3.00 and 4.00" in printed
    assert not (tmp_path / "report").exists()
    for command in ("prepare", "preview"):
        with pytest.raises(TunelabError, match=f"data {command} works on SFT data.*objective kto"):
            run(["data", command, str(config)])
