"""Divergence is said while training, in the final summary and by the doctor, naming the
learning rate and the method's usual range; a single metrics line is enough for the doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


def test_evidence_from_one_line_each_kind():
    from tunelab.diagnostics.divergence import divergence_evidence

    vocab = 49152  # SmolLM2: ln 49152 = 10.80
    assert divergence_evidence([(6, 19.0)], [], vocab) == (
        "loss 19 at step 6 is above 10.8, the loss of guessing uniformly over the "
        "49,152-token vocabulary"
    )
    assert divergence_evidence([(3, 2.5)], [(3, 3e7)], vocab) == "gradient norm 3e+07 at step 3"
    rising = [(1, 3.5), (2, 3.4), (3, 3.6), (4, 4.0), (5, 8.0)]
    assert divergence_evidence(rising, [], vocab) == (
        "loss rose from 3.5 (first steps) to 8 (step 5)"
    )
    # a healthy run, and a random model sitting at the uniform level, say nothing
    assert divergence_evidence([(1, 3.5), (2, 3.1), (3, 2.9), (4, 2.7)], [(4, 1.2)], vocab) is None
    assert divergence_evidence([(1, 6.02), (2, 5.9)], [(2, 4.1)], 384) is None


def test_usual_ranges_name_the_method():
    from tunelab.diagnostics.divergence import usual_range

    assert usual_range("lora") == "LoRA usually trains at 1e-4 to 5e-4"
    assert usual_range("full") == "Full fine-tuning usually trains at 1e-5 to 5e-5"
    assert usual_range("prompt_tuning") == "Prompt tuning usually trains at 3e-3 to 3e-2"


def test_training_warns_during_the_run_and_in_the_summary(make_config, tmp_path):
    # full fine-tuning at learning_rate 1 on the tiny model: loss 6.0 -> 22 within 6 steps
    config = make_config(method="full", learning_rate=1.0, max_steps=6, plot=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = cli("train", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # once as it happens (a warning, on stderr), once in the summary (the report, on stdout)
    during = [x for x in done.stderr.splitlines() if x.startswith("warning: training")]
    summary = [x for x in done.stdout.splitlines() if x.startswith("Warning: training")]
    assert len(during) == 1 and len(summary) == 1, (done.stdout, done.stderr)
    warnings = [during[0].removeprefix("warning: "), summary[0].removeprefix("Warning: ")]
    for text in warnings:
        assert "the loss of guessing uniformly over the 384-token vocabulary" in text
        assert (
            "learning_rate 1 is too high: Full fine-tuning usually trains at 1e-5 to 5e-5" in text
        )
    results = json.loads((Path(config.output_dir) / "results.json").read_text())
    assert results["warnings"] == [warnings[1]]
    assert results["vocab_size"] == 384
    # the summary reports where the run ended, not only where it first went wrong
    final_loss = results["final_train_loss"]
    assert f"loss {final_loss:.4g} at step 6" in warnings[1]


def test_a_healthy_run_gets_no_divergence_warning(make_config):
    from tunelab.api import FineTuner

    results = FineTuner(make_config(max_steps=4, plot=False)).train()
    assert "warnings" not in results and results["vocab_size"] == 384


def write_run(folder: Path, lines: list[dict], **config) -> Path:
    folder.mkdir(parents=True)
    values = {"method": "lora", "learning_rate": 0.5, **config}
    (folder / "tunelab_config.yaml").write_text(yaml.safe_dump(values))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_doctor_finds_divergence_from_a_single_metrics_line(tmp_path, tiny_model_dir):
    from tunelab.diagnostics.run_report import diagnose_run

    run = write_run(
        tmp_path / "run",
        [{"step": 6, "loss": 19.0, "lr": 0.1, "grad_norm": 2.0}],
        model_name=str(tiny_model_dir),
    )
    (found,) = [f for f in diagnose_run(run) if f.code == "loss_diverging"]
    assert found.severity == "error"
    assert "loss 19 at step 6 is above 6.0" in found.evidence
    assert "learning_rate 0.5" in found.evidence
    assert found.fix.startswith(
        "learning_rate 0.5 is too high: LoRA usually trains at 1e-4 to 5e-4. Lower it"
    )


def test_doctor_finds_an_exploded_gradient_norm_in_one_line(tmp_path):
    from tunelab.diagnostics.run_report import diagnose_run

    run = write_run(tmp_path / "run", [{"step": 1, "loss": 3.2, "lr": 0.5, "grad_norm": 3e7}])
    (found,) = [f for f in diagnose_run(run) if f.code == "loss_diverging"]
    assert "gradient norm 3e+07 at step 1" in found.evidence


def test_doctor_reads_the_vocabulary_from_results(tmp_path):
    from tunelab.diagnostics.run_report import diagnose_run

    run = write_run(tmp_path / "run", [{"step": 1, "loss": 12.0, "grad_norm": 1.0}])
    (run / "results.json").write_text(json.dumps({"vocab_size": 49152, "steps": 1}))
    (found,) = [f for f in diagnose_run(run) if f.code == "loss_diverging"]
    assert "above 10.8" in found.evidence and "49,152-token" in found.evidence


@pytest.mark.slow
def test_issue_case_lora_at_learning_rate_half_on_the_default_model(tmp_path):
    """The reported run: SmolLM2-135M, LoRA, learning_rate 0.5, 6 steps."""
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "dataset_path": "train.jsonl",
        "output_dir": "run",
        "learning_rate": 0.5,
        "max_steps": 6,
        "batch_size": 4,
        "max_length": 64,
        "logging_steps": 1,
        "plot": False,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = cli("train", "config.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: training is diverging" in done.stderr, done.stderr
    assert "learning_rate 0.5 is too high: LoRA usually trains at 1e-4 to 5e-4" in done.stdout
    doctor = cli("doctor", "run", cwd=tmp_path)
    assert "Training is diverging (loss_diverging)" in doctor.stdout, doctor.stdout
