"""tunelab doctor knows preference tuning's failure modes (synthetic metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunelab.diagnostics.run_report import diagnose_run


def preference_run(folder: Path, chosen, rejected, accuracy, margins) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, values in enumerate(zip(chosen, rejected, accuracy, margins, strict=True), 1):
        c, r, a, m = values
        lines.append({
            "step": step, "loss": 0.6 - step * 0.01, "lr": 1e-4, "grad_norm": 0.5,
            "logps/chosen": c, "logps/rejected": r, "rewards/accuracies": a,
            "rewards/margins": m, "rewards/chosen": m / 2, "rewards/rejected": -m / 2,
        })  # fmt: skip
    lines.append({"step": len(chosen), "eval_loss": 0.5, "eval_rewards/accuracies": 0.8})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    results = {"steps": len(chosen), "train_tokens": 10_000, "train_loss_tokens": 4_000}
    (folder / "results.json").write_text(json.dumps(results))
    config = {"objective": "dpo", "beta": 0.1, "learning_rate": 1e-4, "max_steps": len(chosen)}
    (folder / "tunelab_config.yaml").write_text(yaml.safe_dump(config))
    return folder


def _codes(run: Path) -> set[str]:
    return {f.code for f in diagnose_run(run)}


def _line(n, start, end):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def test_healthy_preference_run_has_no_preference_findings(tmp_path):
    run = preference_run(
        tmp_path / "run", _line(20, -40, -39.5), _line(20, -45, -50), _line(20, 0.5, 0.95),
        _line(20, 0.0, 2.0),
    )  # fmt: skip
    assert not {c for c in _codes(run) if c.startswith("preference_")}


def test_chosen_falling_with_rejected_is_flagged(tmp_path):
    run = preference_run(
        tmp_path / "run", _line(20, -40, -48), _line(20, -45, -60), _line(20, 0.5, 0.9),
        _line(20, 0.0, 2.0),
    )  # fmt: skip
    finding = {f.code: f for f in diagnose_run(run)}["preference_chosen_falling"]
    assert "logps/chosen fell from -40.63 to -47.37" in finding.evidence


def test_accuracy_stuck_at_half_is_flagged(tmp_path):
    run = preference_run(
        tmp_path / "run", _line(20, -40, -40), _line(20, -45, -45), [0.5, 0.45, 0.55, 0.5] * 5,
        _line(20, 0.0, 0.1),
    )  # fmt: skip
    assert "preference_accuracy_stuck" in _codes(run)


def test_exploding_margins_are_flagged(tmp_path):
    run = preference_run(
        tmp_path / "run", _line(20, -40, -39), _line(20, -45, -200), _line(20, 0.6, 1.0),
        _line(20, 0.0, 30.0),
    )  # fmt: skip
    assert "preference_margins_exploding" in _codes(run)


def test_preference_data_is_not_reread_as_sft_data(tmp_path, tiny_model_dir):
    """doctor re-read a preference run's pairs through the SFT data stage and reported
    'could not be re-read' with a schema error telling the user to rename valid columns."""
    import shutil

    from conftest import preference_pairs, write_jsonl

    run = preference_run(tmp_path / "run", *[_line(8, a, b) for a, b in
                         [(-20, -19), (-20, -30), (0.5, 0.9), (0.0, 1.0)]])  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, run / name)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("What is {}? "))
    config = yaml.safe_load((run / "tunelab_config.yaml").read_text())
    config.update(dataset_path=str(pairs), model_name=str(tiny_model_dir))
    (run / "tunelab_config.yaml").write_text(yaml.safe_dump(config))
    findings = diagnose_run(run)
    assert not [f for f in findings if "cannot tell the schema" in f.evidence]
    assert "data_unavailable" not in {f.code for f in findings}
    # the generic collator probe warned that EOS is masked, which tunelab's pairs never do
    assert "eos_masked" not in {f.code for f in findings}
    (note,) = [f for f in findings if f.code == "pad_is_eos"]
    assert "dpo training labels each answer by its span, with the token that closes it" in (
        note.evidence
    )
