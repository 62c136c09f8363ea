"""tunelab doctor: each problem shown by a run folder built to have it, and no false alarms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from tunelab.cli import main
from tunelab.diagnostics.environment import suggest_batch_size
from tunelab.diagnostics.run_report import diagnose_run
from tunelab.errors import TunelabError

CONFIG = {
    "learning_rate": 3e-4,
    "precision": "bf16",
    "max_length": 64,
    "lora_dropout": 0.1,
    "lora_r": 8,
    "max_grad_norm": 1.0,
    "target_modules": ["q_proj", "v_proj"],
}


def synthetic_run(
    folder: Path,
    losses: list[float],
    grad_norms: list[float] | None = None,
    evals: dict[int, float] | None = None,
    results: dict | None = None,
    config: dict | None = None,
) -> Path:
    """A run folder with metrics.jsonl, results.json and tunelab_config.yaml written by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "eval_loss": v} for s, v in (evals or {}).items() if s == 0]
    for step, loss in enumerate(losses, start=1):
        grad = grad_norms[step - 1] if grad_norms else 0.5
        lines.append(
            {"step": step, "epoch": step / 10, "loss": loss, "lr": 3e-4, "grad_norm": grad}
        )
        if evals and step in evals:
            lines.append({"step": step, "eval_loss": evals[step]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    base = {"steps": len(losses), "train_tokens": 10_000, "train_loss_tokens": 4_000}
    if results is not False:
        (folder / "results.json").write_text(json.dumps({**base, **(results or {})}))
    (folder / "tunelab_config.yaml").write_text(yaml.safe_dump({**CONFIG, **(config or {})}))
    return folder


def codes(findings) -> dict[str, object]:
    return {f.code: f for f in findings}


def falling(n: int = 20, start: float = 3.0, end: float = 1.5) -> list[float]:
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def test_healthy_synthetic_run_has_no_findings(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run", falling(), evals={0: 3.2, 10: 2.4, 20: 2.0})
    assert diagnose_run(run) == []
    assert main(["doctor", str(run)]) == 0
    assert "0 problem(s), 0 note(s)" in capsys.readouterr().out


def test_nan_loss_names_the_step_and_exits_1(tmp_path, capsys):
    run = synthetic_run(
        tmp_path / "run", [2.0, 1.9, 1.8, float("nan")], config={"precision": "fp16"}
    )
    finding = codes(diagnose_run(run))["loss_nan"]
    assert finding.severity == "error"
    assert "loss = nan at step 4" in finding.evidence
    assert "precision: bf16 or fp32" in finding.fix
    assert main(["doctor", str(run)]) == 1
    assert "[ERROR] Loss became nan (loss_nan)" in capsys.readouterr().out


def test_diverging_loss(tmp_path):
    run = synthetic_run(tmp_path / "run", falling(20, 2.0, 6.0), config={"learning_rate": 3e-3})
    finding = codes(diagnose_run(run))["loss_diverging"]
    assert "rose from 2.3158 (steps 1-4) to 5.6842 (steps 17-20)" in finding.evidence
    # the method's usual range, not a third of a rate that was far too high
    assert "learning_rate 0.003 is too high: LoRA usually trains at 1e-4 to 5e-4" in finding.fix
    assert "--set learning_rate=5e-4" in finding.fix


def test_flat_loss_blames_a_tiny_learning_rate(tmp_path):
    losses = [2.0 + 0.001 * (i % 3) for i in range(12)]
    run = synthetic_run(tmp_path / "run", losses, config={"learning_rate": 1e-6})
    finding = codes(diagnose_run(run))["loss_flat"]
    assert "over 12 logged steps" in finding.evidence
    assert "learning_rate 1e-06 is too low" in finding.fix


def test_flat_loss_with_a_huge_learning_rate_says_lower_it(tmp_path):
    # measured on the tiny model: learning_rate 3.0, no clipping, loss 5.98 -> 6.01 in 10 steps
    losses = [5.9834, 5.924, 5.9695, 5.9577, 5.9747, 5.9601, 5.9644, 5.969, 5.9922, 6.0061]
    run = synthetic_run(tmp_path / "run", losses, config={"learning_rate": 3.0})
    finding = codes(diagnose_run(run))["loss_flat"]
    assert "a -0.8% change over 10 logged steps" in finding.evidence
    assert "learning_rate 3.0 is far above the usual" in finding.fix
    assert "raise learning_rate" not in finding.fix


def test_flat_train_loss_with_improving_eval_is_not_flagged(tmp_path):
    losses = [2.0 + 0.001 * (i % 3) for i in range(12)]
    run = synthetic_run(
        tmp_path / "run",
        losses,
        evals={0: 3.0, 12: 2.5},
        results={"initial_eval_loss": 3.0, "best_eval_loss": 2.5},
    )
    assert "loss_flat" not in codes(diagnose_run(run))


def test_empty_loss_mask_is_an_error(tmp_path):
    losses = [2.0] * 10
    run = synthetic_run(
        tmp_path / "run",
        losses,
        results={
            "train_loss_tokens": 0,
            "data": {"examples": 50, "examples_without_loss_tokens": 50},
        },
    )
    found = codes(diagnose_run(run))
    assert found["loss_mask_empty"].severity == "error"
    assert "train_loss_tokens 0 of train_tokens 10,000 (0.00%)" in found["loss_mask_empty"].evidence
    assert (
        "50 of 50 training examples have no loss token"
        in found["examples_without_loss_tokens"].evidence
    )
    assert "the loss covered only 0.0% of the tokens" in found["loss_flat"].fix


def test_overfitting(tmp_path):
    evals = {0: 3.0, 5: 2.5, 10: 2.2, 15: 2.4, 20: 2.6}
    run = synthetic_run(tmp_path / "run", falling(20, 3.0, 0.5), evals=evals)
    finding = codes(diagnose_run(run))["overfitting"]
    assert "best at step 10 (2.2000) and rose to 2.6000 by step 20 (+18.2%)" in finding.evidence
    assert "num_epochs 1" in finding.fix
    assert "lora_dropout (now 0.1)" in finding.fix


def test_gradient_norm_spikes(tmp_path):
    norms = [0.5] * 10
    norms[6] = 9.0
    run = synthetic_run(tmp_path / "run", falling(10), grad_norms=norms)
    finding = codes(diagnose_run(run))["grad_norm_spikes"]
    assert "1 of 10 logged steps" in finding.evidence
    assert "step 7: 9" in finding.evidence
    assert "median 0.5" in finding.evidence


def test_unfinished_run_and_missing_eval(tmp_path):
    run = synthetic_run(tmp_path / "run", falling(5), results=False, config={"max_steps": 100})
    found = codes(diagnose_run(run))
    assert "the last logged step is 5 of max_steps 100" in found["run_unfinished"].evidence
    assert found["no_eval"].severity == "info"


def test_truncation_from_recorded_counts(tmp_path):
    run = synthetic_run(
        tmp_path / "run",
        falling(),
        evals={0: 3.2, 20: 2.0},
        results={"data": {"examples": 10, "truncated_examples": 8}},
    )
    finding = codes(diagnose_run(run))["truncation"]
    assert finding.severity == "warning"
    assert "8 of 10 training examples (80%) are longer than max_length 64" in finding.evidence


def test_transformers_trainer_state_is_read(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    history = [
        {"step": i + 1, "loss": v, "learning_rate": 1e-3} for i, v in enumerate(falling(10, 1, 4))
    ]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert "loss_diverging" in codes(diagnose_run(folder))


# --- errors ---


def test_errors_name_the_folder_and_the_fix(tmp_path, capsys):
    with pytest.raises(TunelabError, match="is not a folder. Pass a run folder"):
        diagnose_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="so it is not a training run"):
        diagnose_run(tmp_path / "empty")
    run = synthetic_run(tmp_path / "run", falling(4))
    with (run / "metrics.jsonl").open("a") as file:  # an edit: a cut line with more after it
        file.write('{"step": 5, "loss"\n{"step": 6, "loss": 1.0}\n')
    # doctor reports the damaged line as one finding and checks the others
    damaged = codes(diagnose_run(run))["damaged_file"]
    assert "metrics.jsonl:5 is not valid JSON" in damaged.evidence
    assert main(["doctor", str(tmp_path / "missing")]) == 2
    assert "error: " in capsys.readouterr().err


# --- run folders with a real tokenizer and data (no training needed) ---


def tokenizer_run(
    tmp_path: Path,
    model_dir: Path,
    rows: list[dict],
    config: dict | None = None,
    chat: bool = True,
) -> Path:
    """A run folder as tunelab writes it (tokenizer, config, run_info), metrics healthy."""
    from tunelab.config import FineTuningConfig

    run = synthetic_run(tmp_path / "run", falling(), evals={0: 3.2, 20: 2.0})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, run / name)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    values = dict(
        model_name=str(model_dir),
        dataset_path=str(data),
        output_dir=str(run),
        max_length=64,
        dedup_exact=False,
        dedup_near_threshold=None,
        data_cache=False,
    )
    FineTuningConfig(**{**values, **(config or {})}).save(run / "tunelab_config.yaml")
    info = {"base_model": str(model_dir), "chat": chat, "system_prompt": None}
    (run / "run_info.json").write_text(json.dumps(info))
    return run


def qa(rows: list[dict]) -> list[dict]:
    return [{"prompt": f"What does {r['term']} mean?", "completion": r["definition"]} for r in rows]


def test_real_tokenizer_run_without_problems_only_notes_pad_is_eos(
    tmp_path, tiny_model_dir, qa_rows
):
    run = tokenizer_run(tmp_path, tiny_model_dir, qa(qa_rows))
    found = codes(diagnose_run(run))
    assert set(found) == {"pad_is_eos"}
    assert "EOS is among its" in found["pad_is_eos"].evidence
    assert "'<|im_end|>'" in found["pad_is_eos"].evidence


def test_most_examples_truncated_by_retokenizing(tmp_path, tiny_model_dir, qa_rows):
    run = tokenizer_run(tmp_path, tiny_model_dir, qa(qa_rows), config={"max_length": 16})
    finding = codes(diagnose_run(run))["truncation"]
    assert finding.severity == "warning"
    assert "6 of 6 training examples (100%) are longer than max_length 16" in finding.evidence
    assert "re-tokenized data" in finding.evidence
    assert "raise max_length (now 16) to 64" in finding.fix


def test_padding_without_packing(tmp_path, tiny_model_dir, qa_rows):
    long_prompt = "Explain " + " ".join(f"term{i} and idea{i * 7}" for i in range(20)) + "."
    rows = qa(qa_rows) + [{"prompt": long_prompt, "completion": "The core."}]
    run = tokenizer_run(
        tmp_path,
        tiny_model_dir,
        rows,
        config={"packing": False, "batch_size": 8, "max_length": 512},
    )
    finding = codes(diagnose_run(run))["padding"]
    assert finding.severity == "warning"
    assert "packing off, batch_size 8" in finding.evidence
    assert "turn packing on" in finding.fix
    # one row per micro-batch is never padded
    single = tokenizer_run(
        tmp_path / "p", tiny_model_dir, rows, config={"packing": False, "batch_size": 1}
    )
    assert "padding" not in codes(diagnose_run(single))


def test_padding_share_counts_tokens_exactly(tiny_model_dir):
    from tunelab.config import FineTuningConfig
    from tunelab.data.tokenize import TokenizedExample
    from tunelab.diagnostics.data_checks import padding_share

    examples = [TokenizedExample([1] * n, [1] * n) for n in (10, 10, 10, 50)]
    config = FineTuningConfig(packing=False, batch_size=4, max_length=64)
    share, real, padded = padding_share(examples, config)
    assert (real, padded) == (80, 200)
    assert share == pytest.approx(0.6)
    # without grouping the trainer draws rows at random, and the report counts that batching
    lengths = [10] * 12 + [50] * 4
    examples = [TokenizedExample([1] * n, [1] * n) for n in lengths]
    grouped = padding_share(examples, FineTuningConfig(packing=False, batch_size=4))
    drawn = padding_share(
        examples, FineTuningConfig(packing=False, batch_size=4, group_by_length=False)
    )
    assert grouped[2] == 3 * 4 * 10 + 4 * 50 and drawn[2] > grouped[2]


def test_chat_template_changed_since_training(tmp_path, tiny_model_dir, qa_rows):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    template = (base / "chat_template.jinja").read_text()
    (base / "chat_template.jinja").write_text(template.replace("'\n'", "'\n\n'", 1))
    run = tokenizer_run(tmp_path, tiny_model_dir, qa(qa_rows))
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "base_model": str(base)}))
    finding = codes(diagnose_run(run))["chat_template_changed"]
    assert finding.evidence.startswith("line 2: run has")
    assert "run folder's template" in finding.fix


def test_chat_template_missing_from_run(tmp_path, tiny_model_dir, qa_rows):
    run = tokenizer_run(tmp_path, tiny_model_dir, qa(qa_rows))
    (run / "chat_template.jinja").unlink()
    config = json.loads((run / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (run / "tokenizer_config.json").write_text(json.dumps(config))
    found = codes(diagnose_run(run))
    assert found["chat_template_missing"].severity == "error"
    assert "copy chat_template.jinja" in found["chat_template_missing"].fix


def test_plain_training_of_a_chat_model(tmp_path, tiny_model_dir, qa_rows):
    run = tokenizer_run(
        tmp_path, tiny_model_dir, qa(qa_rows), config={"chat_format": "plain"}, chat=False
    )
    assert "chat_format: auto" in codes(diagnose_run(run))["chat_template_unused"].fix


def test_template_without_eos_is_caught_by_the_probe(tmp_path, tiny_model_dir, qa_rows):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text().replace("<|im_end|>", "<|endoftext|>")
    (model / "chat_template.jinja").write_text(template)
    run = tokenizer_run(tmp_path, model, qa(qa_rows))
    finding = codes(diagnose_run(run))["eos_not_trained"]
    assert "EOS is not among its trained tokens" in finding.evidence


def test_pad_equal_to_eos_in_a_folder_trained_elsewhere(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    folder = tmp_path / "other-tool"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder)
    finding = codes(diagnose_run(folder))["eos_masked"]
    assert "gives label -100 for the EOS position" in finding.evidence
    tokenizer.pad_token = "<|endoftext|>"  # a pad token of its own: nothing to flag
    tokenizer.save_pretrained(folder)
    assert "eos_masked" not in codes(diagnose_run(folder))


def test_healthy_trained_tiny_run_gets_no_false_alarms(make_config, tmp_path, capsys):
    from tunelab.api import FineTuner

    eval_data = write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt": "What does byte mean?", "completion": "Eight bits."}]
    )
    config = make_config(max_steps=8, learning_rate=1e-2, eval_path=str(eval_data))
    FineTuner(config).train()
    capsys.readouterr()
    found = diagnose_run(config.output_dir)
    assert [f.code for f in found] == ["pad_is_eos"]
    assert main(["doctor", config.output_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["severity"] for f in report["findings"]] == ["info"]


# --- environment ---


def test_environment_report_names_versions_and_choices(capsys):
    import torch

    from tunelab.device import choose_placement

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["Software"]["torch"] == torch.__version__
    assert set(report["Software"]) >= {"transformers", "peft", "accelerate", "datasets"}
    choice = report["What tunelab would choose here"]
    assert choice["precision"].startswith(choose_placement("auto").precision + " (")
    assert "memory allows up to" in choice["batch_size"]
    assert "GiB total" in report["Memory and disk"]["RAM"]
    assert "default model" in report["Model cache"]


def test_batch_size_suggestion_follows_memory():
    size, reason = suggest_batch_size("fp32", "cpu", 64 * 2**30)
    assert size == 32
    small, why = suggest_batch_size("fp32", "cpu", 2**30)
    assert small == 1
    assert "even batch 1 needs" in why


def test_gpu_section_lists_each_device(monkeypatch):
    import types

    import torch

    from tunelab.diagnostics.environment import gpus

    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (100 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    title, rows = gpus()
    assert rows == [
        ("CUDA", "12.8, 1 device(s)"),
        ("cuda:0", "NVIDIA H200, 140.0 GiB (100.0 GiB free), compute capability 9.0"),
    ]
