import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.api import FineTuner
from tunelab.errors import TunelabError
from tunelab.training.loop import accumulate_gradients
from tunelab.training.schedule import lr_factor


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_short_run_writes_a_complete_run_folder(make_config, tiny_model_dir, tmp_path, capsys):
    config = make_config(eval_path=str(tmp_path / "train.jsonl"))
    results = FineTuner(config).train()
    out = tmp_path / "run"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "tunelab_config.yaml",
        "metrics.jsonl",
        "results.json",
        "run_info.json",
    ):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert adapter_config["r"] == 8 and sorted(adapter_config["target_modules"]) == [
        "q_proj",
        "v_proj",
    ]
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert results["steps"] == 6 and results["train_tokens"] > 0
    assert results["tokens_per_second"] > 0
    assert results["eval_loss"] < results["initial_eval_loss"]  # it learned something
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert metrics[0] == {
        "step": 0,
        "eval_loss": results["initial_eval_loss"],
        "eval_perplexity": pytest.approx(2.718281828 ** results["initial_eval_loss"], rel=1e-3),
    }
    printed = capsys.readouterr().out
    assert "Trainable parameters: 3,584 (3.51%)" in printed


def test_pinned_loss_of_a_seeded_run(make_config):
    """A change to the training step that moves the numbers shows up here at once."""
    results = FineTuner(make_config(max_steps=4)).train()
    assert results["final_train_loss"] == pytest.approx(5.926021, abs=1e-4)
    assert results["train_tokens"] == 752


def test_loss_goes_down(make_config, tmp_path):
    results = FineTuner(
        make_config(max_steps=30, learning_rate=1e-2, target_modules=["all-linear"])
    ).train()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert results["final_train_loss"] < 0.9 * first["loss"]


def test_gradient_accumulation_equals_one_large_batch(make_config):
    tuner = FineTuner(make_config(lora_dropout=0.0))
    rows = tuner.prepare_dataset()[:4]
    model = tuner.prepare_model()
    # give B non-zero values so gradients reach A too
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    pad = tuner.tokenizer.pad_token_id

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        loss, tokens = accumulate_gradients(model, micro_batches, pad)
        return loss, tokens, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole = grads([rows])
    for split in ([rows[:2], rows[2:]], [[r] for r in rows], [rows[:1], rows[1:]]):
        part = grads(split)
        assert part[1] == whole[1]
        assert part[0] == pytest.approx(whole[0], rel=1e-5)
        for a, b in zip(part[2], whole[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_schedules():
    assert lr_factor(0, 10, 2, "linear") == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 2, "linear") == 1.0
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 * (1 + 0.7071067811865476))
    assert lr_factor(9, 10, 2, "constant") == 1.0


def test_refuses_a_non_empty_output_dir_unless_told(make_config, tmp_path):
    FineTuner(make_config(max_steps=1)).train()
    with pytest.raises(
        TunelabError,
        match=r"is not empty \(it holds .*\). Pass --overwrite to replace the \d+ file\(s\) "
        r"tunelab wrote there, --resume to continue that run",
    ):
        FineTuner(make_config(max_steps=1)).train()
    FineTuner(make_config(max_steps=2)).train(overwrite=True)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 2
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_text("x")
    with pytest.raises(
        TunelabError, match=r"files tunelab did not write \(cat.jpg\), so --overwrite will not"
    ):
        FineTuner(make_config(output_dir=str(stranger))).train(overwrite=True)
    assert (stranger / "cat.jpg").exists()
    with pytest.raises(TunelabError, match="holds no run to resume"):
        FineTuner(make_config(output_dir=str(tmp_path / "new"))).train(resume=True)


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(make_config, tmp_path):
    import shutil

    full = make_config(max_steps=8, save_steps=3, lora_dropout=0.1)
    FineTuner(full).train()
    whole = tmp_path / "run"
    # simulate a crash after step 6: keep only the checkpoint, drop the final outputs
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole, interrupted)
    for name in ("adapter_model.safetensors", "results.json"):
        (interrupted / name).unlink()
    checkpoints = sorted((interrupted / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000003", "step-000006"]
    resumed = make_config(max_steps=8, save_steps=3, lora_dropout=0.1, output_dir=str(interrupted))
    results = FineTuner(resumed).train(resume=True)
    assert results["steps"] == 8
    a, b = adapter(whole), adapter(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise, fp32 on CPU

    def losses(folder):
        return [
            (m["step"], m["loss"], m["lr"])
            for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if "loss" in m
        ]

    assert losses(interrupted) == losses(whole)
