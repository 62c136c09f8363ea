"""The loop's step and state: AdaLoRA's loss term and schedule, the typed trainer state."""

import copy
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunelab.api import FineTuner
from tunelab.errors import TunelabError
from tunelab.training.batching import collate
from tunelab.training.loop import total_steps
from tunelab.training.state import TrainState


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def unfinish(run):
    """A run folder as a crash after its last checkpoint leaves it."""
    for name in ("adapter_model.safetensors", "results.json"):
        (run / name).unlink()


def test_adalora_orthogonality_term_is_in_the_loss_before_clipping(make_config, tmp_path):
    """PEFT's AdaLoraModel.forward adds orth_reg_weight x the mean ||P P^T - I||_F to the loss;
    its gradient must be in the gradient that is measured and clipped (it once ran in an
    optimizer pre-hook, after clipping, so the logged norm lacked it)."""
    config = make_config(
        method="adalora", max_steps=3, batch_size=64, gradient_accumulation_steps=1,
        packing=False, max_grad_norm=1e-3,
    )  # fmt: skip
    tuner = FineTuner(config)
    rows = tuner.prepare_dataset()
    tuner.prepare_model(total_steps(len(rows), config))
    before = copy.deepcopy(tuner.model)  # one step holds every row: one batch to check
    tuner.train(train_dataset=rows, eval_dataset=[])
    first = metrics(tmp_path / "run")[0]

    before.train()
    batch = collate(rows, tuner.tokenizer.pad_token_id)
    with_penalty = before(**batch).loss  # PEFT's forward: the loss plus its regularisation
    plain = before.base_model.model(**batch).loss  # the causal LM's own loss
    with_penalty.backward()
    grads = [p.grad.flatten() for p in before.parameters() if p.grad is not None]
    norm = float(torch.cat(grads).norm())

    assert first["step"] == 1
    assert first["orth_reg"] == pytest.approx(float((with_penalty - plain).detach()), rel=1e-4)
    assert first["orth_reg"] > 1e-3  # the check below is not vacuous
    assert first["loss"] == pytest.approx(float(plain.detach()), rel=1e-4)  # the objective alone
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-3)


def test_a_resumed_adalora_run_continues_its_rank_schedule(make_config, tmp_path):
    """AdaLoRA prunes ranks by the step number: a run resumed at step 6 of 8 must go on from
    step 7 (with the importance scores it had), not start its schedule again at 1."""
    options = dict(method="adalora", max_steps=8, save_steps=3, learning_rate=2e-2)
    FineTuner(make_config(**options)).train()
    whole = tmp_path / "run"
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole, interrupted)
    unfinish(interrupted)
    results = FineTuner(make_config(**options, output_dir=str(interrupted))).train(resume=True)
    assert results["steps"] == 8
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(interrupted / "adapter_model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def rank_pattern(folder):
        return json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]

    assert rank_pattern(whole) and rank_pattern(whole) == rank_pattern(interrupted)
    assert [m.get("loss") for m in metrics(interrupted)] == [m.get("loss") for m in metrics(whole)]


def test_adalora_checkpoints_of_older_tunelab_resume_or_are_refused_by_name(make_config, tmp_path):
    """Older checkpoints lack the allocator state: one from before any pruning resumes; one
    whose adapter PEFT cut to the pruned ranks cannot, and says so (it was a RuntimeError)."""
    options = dict(method="adalora", max_steps=8, save_steps=1, save_total_limit=10)
    FineTuner(make_config(**options)).train()
    run = tmp_path / "run"
    older = tmp_path / "older"
    shutil.copytree(run, older)
    for late in sorted((older / "checkpoints").iterdir())[1:]:
        shutil.rmtree(late)
    first = older / "checkpoints" / "step-000001"
    blob = torch.load(first / "training_state.pt", weights_only=True)
    blob.pop("method_state", None)  # absent from what older tunelab wrote
    torch.save(blob, first / "training_state.pt")
    unfinish(older)
    results = FineTuner(make_config(**options, output_dir=str(older))).train(resume=True)
    assert results["steps"] == 8

    # as tunelab wrote a checkpoint after a pruning: PEFT's cut adapter and its pattern
    last = run / "checkpoints" / "step-000007"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(run / name, last / name)
    unfinish(run)
    with pytest.raises(TunelabError) as error:
        FineTuner(make_config(**options)).train(resume=True)
    message = str(error.value)
    assert f"checkpoint {last} does not fit this model (size mismatch for " in message
    assert "AdaLoRA adapter cut to its pruned ranks" in message
    assert f"Delete the folder {last} to resume from the checkpoint before it" in message


def test_trainer_state_of_an_older_run_is_read_and_a_damaged_one_named(tmp_path):
    source = tmp_path / "trainer_state.json"
    older = {  # as tunelab wrote it before the state was typed (no reference_seconds)
        "step": 6, "tokens": 900, "loss_tokens": 300, "train_seconds": 1.5,
        "best_eval_loss": None, "evals_without_improvement": 0, "skipped_steps": 0,
        "processes": 1, "eval_loss_at_step": None,
    }  # fmt: skip
    state = TrainState.from_json(older, source)
    assert state == TrainState(step=6, tokens=900, loss_tokens=300, train_seconds=1.5)
    assert TrainState.from_json(state.to_json(), source) == state
    for bad, message in (
        ({"tokens": 3}, "holds no training step"),
        ({**older, "step": "six"}, "step is 'six', not a number"),
        ({**older, "step": True}, "step is True, not a number"),
        ({**older, "epoch_seen": 2}, "has keys tunelab does not know: ['epoch_seen']"),
    ):
        with pytest.raises(TunelabError, match=re.escape(message)) as error:
            TrainState.from_json(bad, source)
        assert str(source) in str(error.value) and "--overwrite" in str(error.value)


def test_resume_over_an_edited_trainer_state_is_refused_naming_it(make_config, tmp_path):
    FineTuner(make_config(max_steps=4, save_steps=2)).train()
    run = tmp_path / "run"
    state_file = run / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": "2"}))
    unfinish(run)
    with pytest.raises(TunelabError, match="step is '2', not a number") as error:
        FineTuner(make_config(max_steps=4, save_steps=2)).train(resume=True)
    assert str(state_file) in str(error.value)


def test_adalora_too_short_to_schedule_is_refused_by_name(make_config):
    with pytest.raises(TunelabError, match="adalora needs at least 3 training steps .* has 2"):
        FineTuner(make_config(method="adalora", max_steps=2)).train()
