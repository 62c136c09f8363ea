"""Output that carries a dataset's bytes: reports escape them, terminals see them, not obey."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import yaml

from tunelab.cli import main
from tunelab.config import FineTuningConfig
from tunelab.data.prepare import prepare_examples
from tunelab.data.report import render_markdown
from tunelab.text_safety import drop_controls, markdown_cell, visible

sys.path.insert(0, str(Path(__file__).parent))
from evaluation.test_eval_report import synthetic_results  # noqa: E402
from test_runs import make_run  # noqa: E402

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m\rover\u202egnp.exe"
SCRIPT = "<script>alert(1)</script>"


def test_visible_shows_controls_and_keeps_layout():
    assert (
        visible("a\x1b[31mb\tc\nd\re\x00\x9b\u202e") == "a\\x1b[31mb\tc\nd\\x0de\\x00\\x9b\\u202e"
    )
    assert visible("a\tb\nc", keep_layout=False) == "a\\x09b\\x0ac"
    assert visible("plain text, ünïcode ✓") == "plain text, ünïcode ✓"


def test_markdown_cell_escapes_html_and_markup():
    cell = markdown_cell(f"{SCRIPT} | `code` *b* [l](x)\n<img src=x onerror=y>")
    assert "<" not in cell and ">" not in cell
    assert "&lt;script&gt;" in cell and "\\|" in cell and "\\`code\\`" in cell
    assert "\\*b\\*" in cell and "\\[l\\]" in cell and "\n" not in cell


def test_drop_controls_removes_whole_escape_sequences():
    cleaned, removed = drop_controls(f"ok {ESCAPES} end\r\nnext\x00")
    # the window title, screen clear and colours go whole; a lone CR and NUL go; CRLF stays
    assert cleaned == "ok redover\u202egnp.exe end\r\nnext" and removed == 25


def _data(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_report_markdown_escapes_dataset_text(tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer number {i}."} for i in range(6)]
    rows.append(
        {"prompt": "Hostile?", "completion": f"{SCRIPT} | `x` <img src=x onerror=alert(1)>"}
    )
    rows.append(rows[-1])  # an exact duplicate: the text shows in the duplicates table too
    prepared = prepare_examples(
        FineTuningConfig(dataset_path=str(_data(tmp_path, rows)), data_cache=False)
    )
    markdown = render_markdown(prepared.manifest)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    assert "<script" not in markdown and "<img" not in markdown


def test_eval_markdown_report_escapes_questions_answers_and_paths(tmp_path):
    from tunelab.evaluation.report import markdown_report

    results = synthetic_results(tmp_path)
    results.items[0].question = f"Q {SCRIPT}"
    results.items[0].reference = f"ref <img src=x onerror=alert(1)> {ESCAPES}"
    results.eval_path = f"data/{SCRIPT}.jsonl"
    markdown = markdown_report(results, shown=8)
    assert "<script" not in markdown and "<img" not in markdown and "<b>" not in markdown
    assert "&lt;script&gt;" in markdown and "\x1b" not in markdown


def test_cleaning_drops_control_characters_and_counts_them(tmp_path):
    rows = [{"text": f"Line {i} of ordinary training text for the model."} for i in range(4)]
    # a few escapes in a long row are cleaned; a row mostly made of them is dropped as garbage
    words = " ".join(f"word{i}" for i in range(100))
    rows.append({"text": f"Hidden {ESCAPES} text in a row of otherwise ordinary {words}."})
    config = FineTuningConfig(dataset_path=str(_data(tmp_path, rows)), data_cache=False)
    prepared = prepare_examples(config)
    step = next(s for s in prepared.manifest["steps"] if s["step"] == "control chars")
    assert step["changed"] == 1 and step["removed_chars"] == 23
    assert all("\x1b" not in e.text and "\r" not in e.text for e in prepared.train)
    assert "1 changed (23 characters removed)" in render_markdown(prepared.manifest)
    kept = prepare_examples(dataclasses.replace(config, drop_control_chars=False))
    assert any("\x1b" in e.text for e in kept.train)


def test_runs_compare_and_list_show_escapes_instead_of_running_them(tmp_path, capsys):
    a = make_run(tmp_path / "a", 1e-3, [2.0, 1.0], {0: 2.5, 2: 1.5})
    b = make_run(tmp_path / "b", 1e-3, [2.0, 1.1], {0: 2.5, 2: 1.6})
    config = yaml.safe_load((b / "tunelab_config.yaml").read_text())
    config["system_prompt"] = ESCAPES
    (b / "tunelab_config.yaml").write_text(yaml.safe_dump(config))
    assert (
        main(["runs", "compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--no-plot"]) == 0
    )
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\\x1b]0;pwned\\x07" in out
    evil = make_run(tmp_path / "runs" / "x\x1b[2Jy", 1e-3, [2.0], {0: 2.5, 1: 1.5})
    assert evil.exists()
    main(["runs", "list", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "x\\x1b[2Jy" in out


def test_data_preview_shows_escapes_from_the_data(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"Say {ESCAPES}", "completion": "Done."}] * 2
    path = _data(tmp_path, rows)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model_name": str(tiny_model_dir), "dataset_path": str(path), "data_cache": False}
        )
    )
    args = ["data", "preview", str(config), "--set", "drop_control_chars=false"]
    args += ["--set", "max_nonprintable_ratio=null"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out


def test_error_messages_show_escapes_from_paths(tmp_path, capsys):
    path = tmp_path / "a\x1b]0;pwned\x07.jsonl"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"dataset_path": str(path)}))
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "a\\x1b]0;pwned\\x07.jsonl" in err


def test_doctor_findings_show_escapes(tmp_path, capsys, monkeypatch):
    import tunelab.diagnostics.run_report as run_report
    from tunelab.diagnostics.findings import Finding

    finding = Finding("x", "warning", "title", f"evidence {ESCAPES}", "fix")
    monkeypatch.setattr(run_report, "diagnose_run", lambda run_dir: [finding])
    main(["doctor", str(tmp_path)])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "evidence \\x1b]0;pwned" in out


def test_generate_and_chat_show_escapes_a_model_emits(tmp_path, capsys, monkeypatch):
    import tunelab.generation as generation

    monkeypatch.setattr(generation, "load_for_inference", lambda *a, **k: None)
    monkeypatch.setattr(
        generation, "generate", lambda loaded, prompts, **k: [ESCAPES] * len(prompts)
    )
    assert main(["generate", str(tmp_path), "--prompt", "hi", "--prompt", "there"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("\\x1b]0;pwned\\x07") == 2

    class Loaded:
        source, chat, system_prompt, tokenizer = "m", False, None, None

    monkeypatch.setattr(generation, "generate_from_text", lambda *a, **k: [ESCAPES])
    shown: list[str] = []
    lines = ["hello"]

    def read(_: str) -> str:
        if not lines:
            raise EOFError  # the user pressed Ctrl-D
        return lines.pop()

    generation.chat_loop(Loaded(), input_fn=read, output_fn=shown.append)
    assert "\x1b" not in shown[-1] and "\\x1b[2J" in shown[-1]
