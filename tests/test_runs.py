"""tunelab runs list / compare: finding runs, the differing config, metrics, PNG and HTML."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.runs import compare_html, differing_config, find_runs, list_runs, load_run


def make_run(
    folder: Path, lr: float, losses: list[float], evals: dict[int, float], finished: bool = True
) -> Path:
    folder.mkdir(parents=True)
    config = {"learning_rate": lr, "lora_r": 8, "output_dir": str(folder), "target_modules": ["q"]}
    (folder / "tunelab_config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 0, "eval_loss": evals[0]}] if 0 in evals else []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "loss": loss, "lr": lr, "grad_norm": 1.0})
        if step in evals:
            lines.append({"step": step, "eval_loss": evals[step]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if finished:
        results = {
            "steps": len(losses),
            "final_train_loss": losses[-1],
            "eval_loss": evals[max(evals)],
            "best_eval_loss": min(v for s, v in evals.items() if s > 0),
            "train_runtime_seconds": 12.5,
            "tokens_per_second": 1234.5,
        }
        (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(
        tmp_path / "outputs" / "lr-high", 3e-3, [3.0, 2.0, 1.5, 1.2], {0: 3.1, 2: 2.2, 4: 1.9}
    )
    b = make_run(
        tmp_path / "outputs" / "sweep" / "lr-low",
        1e-4,
        [3.0, 2.9],
        {0: 3.1, 2: 2.8},
        finished=False,
    )
    (a / "checkpoints" / "step-2").mkdir(parents=True)  # checkpoints are not runs
    (a / "checkpoints" / "step-2" / "tunelab_config.yaml").write_text("lora_r: 8\n")
    return a, b


def test_find_runs_recursively_skipping_checkpoints(two_runs, tmp_path):
    a, b = two_runs
    assert find_runs(tmp_path / "outputs") == [a, b]


def test_list_shows_status_and_metrics(two_runs, tmp_path, capsys):
    assert main(["runs", "list", str(tmp_path / "outputs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run", "status", "method", "model", "steps", "train", "loss", "eval", "loss", "best",
        "eval", "time", "s", "tokens/s",
    ]  # fmt: skip
    assert lines[2].split() == [
        "lr-high", "finished", "lora", "-", "4", "1.2000", "1.9000", "1.9000", "12.5", "1,234",
    ]  # fmt: skip
    # an unfinished run shows what its metrics.jsonl holds so far
    assert lines[3].split() == [
        "sweep/lr-low", "unfinished", "lora", "-", "2", "2.9000", "2.8000", "2.8000", "-", "-",
    ]  # fmt: skip


def test_compare_table_png_and_html(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "cmp"
    assert main(["runs", "compare", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Config (only what differs):" in text
    config_lines = text.split("Metrics:")[0].splitlines()
    assert any(line.split() == ["learning_rate", "0.003", "0.0001"] for line in config_lines)
    assert not any(line.startswith(("lora_r", "output_dir")) for line in config_lines)
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (out / "compare.html").read_text()
    assert page.count("<polyline") == 4  # train and eval of both runs
    assert "<td>learning_rate</td><td>0.003</td><td>0.0001</td>" in page
    assert "<script" not in page and "src=" not in page  # self-contained, static


def test_differing_config_ignores_equal_and_output_dir(two_runs):
    runs = [load_run(p) for p in two_runs]
    assert differing_config(runs) == {"learning_rate": [3e-3, 1e-4]}


def test_html_escapes_run_names_and_values(tmp_path):
    a = make_run(tmp_path / "<b>x&y", 1e-3, [2.0, 1.0], {0: 2.5, 2: 1.5})
    b = make_run(tmp_path / "plain", 1e-3, [2.0, 1.1], {0: 2.5, 2: 1.6})
    config = yaml.safe_load((b / "tunelab_config.yaml").read_text())
    config["system_prompt"] = "<script>alert(1)</script>"
    (b / "tunelab_config.yaml").write_text(yaml.safe_dump(config))
    page = compare_html([load_run(a), load_run(b)])
    assert "<b>x" not in page and "<script>" not in page
    assert "&lt;b&gt;x&amp;y train" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_errors(tmp_path, two_runs, monkeypatch):
    a, _ = two_runs
    with pytest.raises(TunelabError, match="is not a folder. Pass the folder that holds your runs"):
        list_runs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert list_runs(tmp_path / "empty").startswith("No runs under")
    with pytest.raises(TunelabError, match="needs at least two run folders, got 1"):
        main(["--debug", "runs", "compare", str(a)])
    with pytest.raises(TunelabError, match="is not a tunelab run folder"):
        load_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(TunelabError, match="pip install matplotlib"):
        main(["--debug", "runs", "compare", str(a), str(a), "--out", str(tmp_path / "c")])
    # --no-plot needs no matplotlib
    assert main(["runs", "compare", str(a), str(a), "--out", str(tmp_path / "c"), "--no-plot"]) == 0
