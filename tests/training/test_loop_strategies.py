"""Training strategies on the tiny model: schedules, clipping, decay groups, evaluation and
checkpoint policies, early stopping, metric sinks, NaN handling, precision, full fine-tuning."""

import dataclasses
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError
from tunelab.training import loop
from tunelab.training.checkpoint import checkpoint_dirs
from tunelab.training.optim import build_optimizer, parameter_groups
from tunelab.training.schedule import lr_factor, warmup_steps_for


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_warmup_in_steps_overrides_the_ratio(make_config, tmp_path):
    assert warmup_steps_for(100, 0.1) == 10
    assert warmup_steps_for(100, 0.1, warmup_steps=3) == 3
    assert warmup_steps_for(5, 0.1, warmup_steps=30) == 5
    FineTuner(make_config(max_steps=6, warmup_steps=2, lr_scheduler="constant")).train()
    lrs = [m["lr"] for m in metrics(tmp_path / "run") if "lr" in m]
    peak = 3e-3
    assert lrs == pytest.approx([peak / 3, 2 * peak / 3, peak, peak, peak, peak])
    assert lr_factor(3, 6, 2, "linear") == pytest.approx(0.75)


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3  # linear bias, norm weight, norm bias


def test_optimizer_is_fused_adamw_or_8bit(tiny_model_dir):
    model = torch.nn.Linear(64, 64)
    config = FineTuningConfig(model_name=str(tiny_model_dir), weight_decay=0.01)
    optimizer, note = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW) and note == "AdamW (fused)"
    config = dataclasses.replace(config, optimizer="adamw_8bit")
    optimizer, note = build_optimizer(model, config)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "adamw_8bit is unavailable" in note and "using 32-bit AdamW" in note
        return
    assert note == "AdamW 8-bit (bitsandbytes)"
    before = model.weight.detach().clone()
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)
    state = optimizer.state[model.weight]
    assert state["state1"].dtype == torch.uint8  # the moments really are 8-bit


def test_clipping_bounds_the_gradient_norm():
    params = [torch.nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.tensor([3.0, 4.0, 0.0])
    assert loop._clip(params, 1.0) == pytest.approx(5.0)  # the norm before clipping is logged
    assert params[0].grad.norm() == pytest.approx(1.0, rel=1e-5)
    params[0].grad = torch.tensor([3.0, 4.0, 0.0])
    assert loop._clip(params, 0.0) == pytest.approx(5.0)
    assert params[0].grad.norm() == pytest.approx(5.0)  # 0 turns clipping off


def test_eval_every_n_steps_and_not_each_epoch(make_config, tmp_path):
    config = make_config(max_steps=5, eval_steps=2, eval_each_epoch=False)
    config = dataclasses.replace(config, eval_path=config.dataset_path)
    results = FineTuner(config).train()
    evals = [m for m in metrics(tmp_path / "run") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4, 5]
    for m in evals:
        assert m["eval_perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"], rel=1e-3)
    assert results["eval_loss"] == evals[-1]["eval_loss"]
    assert results["best_eval_loss"] == min(m["eval_loss"] for m in evals[1:])


def test_early_stopping_and_keeping_last_k_plus_best(make_config, tmp_path):
    config = make_config(
        max_steps=20,
        eval_steps=1,
        save_steps=1,
        save_total_limit=1,
        early_stopping_patience=3,
        early_stopping_threshold=0.05,  # tiny gains do not count, so patience runs out
        learning_rate=1e-3,
    )
    config = dataclasses.replace(config, eval_path=config.dataset_path)
    results = FineTuner(config).train()
    stopped = results["stopped_early_at_step"]
    assert 3 <= stopped < 20 and results["steps"] == stopped
    evals = {m["step"]: m["eval_loss"] for m in metrics(tmp_path / "run") if "eval_loss" in m}
    kept = [p.name for p in checkpoint_dirs(tmp_path / "run")]
    best_step = min((loss, step) for step, loss in evals.items() if step > 0)[1]
    expected = sorted({f"step-{best_step:06d}", f"step-{stopped:06d}"})
    assert kept == expected


def test_tensorboard_mlflow_and_curves_png(make_config, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    pytest.importorskip("mlflow", reason="the mlflow package is not installed")
    config = make_config(max_steps=3, report_to=["tensorboard", "mlflow"])
    config = dataclasses.replace(config, eval_path=config.dataset_path)
    FineTuner(config).train()
    run = tmp_path / "run"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    losses = [e.value for e in accumulator.Scalars("train/loss")]
    logged = [m["loss"] for m in metrics(run) if "loss" in m]
    assert losses == pytest.approx(logged, rel=1e-6)
    metric_files = list((run / "mlruns").rglob("metrics/loss"))
    assert len(metric_files) == 1 and len(metric_files[0].read_text().splitlines()) == 3
    png = (run / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_missing_reporting_package_and_bad_sink_names(make_config, monkeypatch):
    with pytest.raises(TunelabError, match=r"'tensorbord' is not one. Did you mean 'tensorboard'"):
        make_config(report_to=["tensorbord"])
    with pytest.raises(TunelabError, match="'warmup_steps' is -1"):
        make_config(warmup_steps=-1)
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(TunelabError, match=r"'tensorboard' package is not installed.*pip install"):
        FineTuner(make_config(max_steps=1, report_to=["tensorboard"])).train()


def _nan_on_call(monkeypatch, bad_call):
    real = loop.causal_lm_loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch):
        calls["n"] += 1
        total, count = real(model, batch)
        return (total * float("nan") if calls["n"] == bad_call else total), count

    monkeypatch.setattr(loop, "causal_lm_loss_sum", loss_sum)


def test_nan_loss_stops_with_a_diagnosis(make_config, monkeypatch, tmp_path):
    _nan_on_call(monkeypatch, bad_call=5)  # 2 micro-batches a step: step 3
    config = make_config(max_steps=6, save_steps=2)
    with pytest.raises(TunelabError) as error:
        FineTuner(config).train()
    message = str(error.value)
    assert "non-finite loss (nan) at step 3 (learning rate" in message
    assert "train.jsonl:" in message  # the batch's example origins
    assert "Likely cause: divergence" in message
    assert "Last good checkpoint:" in message and "step-000002" in message
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000002"]


def test_nan_step_is_skipped_when_asked(make_config, monkeypatch, capsys):
    _nan_on_call(monkeypatch, bad_call=3)
    results = FineTuner(make_config(max_steps=4, on_nan="skip", learning_rate=0.05)).train()
    assert results["steps"] == 4 and results["skipped_steps"] == 1
    printed = capsys.readouterr().out
    assert "Skipping the step: non-finite loss (nan) at step 2" in printed
    assert "learning_rate 0.05 is too high" in printed


def test_bf16_keeps_fp32_trainable_weights_over_a_bf16_base(make_config, tmp_path):
    tuner = FineTuner(make_config(max_steps=3, precision="bf16"))
    results = tuner.train()
    dtypes = {p.dtype for p in tuner.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in tuner.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    assert results["precision"] == "bf16" and 4.0 < results["final_train_loss"] < 7.0
    fp32 = FineTuner(make_config(max_steps=3, output_dir=str(tmp_path / "fp32"))).train()
    # the same run in fp32 lands close: bf16 compute changes rounding, not the learning
    assert results["final_train_loss"] == pytest.approx(fp32["final_train_loss"], rel=0.02)


def test_gradient_checkpointing_gives_the_same_run(make_config, tmp_path):
    plain = FineTuner(make_config(max_steps=3)).train()
    tuner = FineTuner(
        make_config(max_steps=3, gradient_checkpointing=True, output_dir=str(tmp_path / "gc"))
    )
    checkpointed = tuner.train()
    assert checkpointed["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=1e-5)
    assert not tuner.model.get_base_model().is_gradient_checkpointing  # switched off after


def test_full_fine_tuning_resumes_exactly(make_config, tmp_path):
    values = dict(method="full", max_steps=4, save_steps=2, learning_rate=1e-4)
    FineTuner(make_config(**values)).train()
    whole = tmp_path / "run"
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole, interrupted)
    for name in ("model.safetensors", "results.json"):
        (interrupted / name).unlink()
    assert [p.name for p in checkpoint_dirs(interrupted)] == ["step-000002"]
    assert (interrupted / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    FineTuner(make_config(**values, output_dir=str(interrupted))).train(resume=True)
    a = load_file(str(whole / "model.safetensors"))
    b = load_file(str(interrupted / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resuming_an_adapter_run_from_a_full_checkpoint_is_refused(make_config, tmp_path):
    FineTuner(make_config(method="full", max_steps=2, save_steps=1)).train()
    from tunelab.training.checkpoint import load_weights

    tuner = FineTuner(make_config(max_steps=2, output_dir=str(tmp_path / "other")))
    model = tuner.prepare_model()
    with pytest.raises(TunelabError, match="holds no adapter_model.safetensors"):
        load_weights(tmp_path / "run" / "checkpoints" / "step-000001", model)


def _wandb_history(path):
    """The history rows of an offline .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
    return rows


def test_wandb_offline_logs_the_metrics(make_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = make_config(max_steps=3, report_to=["wandb"])
    config = dataclasses.replace(config, eval_path=config.dataset_path)
    FineTuner(config).train()
    run = tmp_path / "run"
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = _wandb_history(files[0])
    logged = metrics(run)
    assert [r["train/loss"] for r in history if "train/loss" in r] == pytest.approx(
        [m["loss"] for m in logged if "loss" in m], rel=1e-6
    )
    assert [r["eval/loss"] for r in history if "eval/loss" in r] == pytest.approx(
        [m["eval_loss"] for m in logged if "eval_loss" in m], rel=1e-6
    )
    assert [r["_step"] for r in history if "train/loss" in r] == [1, 2, 3]
