"""Preference tuning through the SFT loop: a short run learns the preference, the reference
log-probabilities are computed once, and the metrics carry TRL's names."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import preference_pairs, write_jsonl

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.training import preference
from tunelab.training.preference import Unit, attach_reference_logps, pack_units


def _config(tmp_path, tiny_model_dir, **overrides) -> FineTuningConfig:
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("What is a {}?"))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", preference_pairs("Define {} please."))
    values = dict(
        model_name=str(tiny_model_dir), dataset_path=str(train), eval_path=str(held_out),
        output_dir=str(tmp_path / "run"), objective="dpo", beta=0.5, learning_rate=5e-3,
        max_steps=12, batch_size=4, max_length=64, precision="fp32", logging_steps=1,
        lora_dropout=0.0, chat_format="plain", eval_each_epoch=False, plot=False,
        target_modules=["all-linear"],
    )  # fmt: skip
    values.update(overrides)
    return FineTuningConfig(**values)


def test_dpo_run_raises_held_out_preference_accuracy(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    results = FineTuner(config).train()
    # at step 0 the adapter is the identity: policy = reference, no pair is preferred yet
    assert results["initial_eval_rewards/accuracies"] == 0.0
    assert results["eval_rewards/accuracies"] >= 0.75
    assert results["eval_rewards/margins"] > 0
    assert results["eval_loss"] < results["initial_eval_loss"] < 0.7
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_records = [r for r in records if "loss" in r]
    for name in (
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected",
    ):  # fmt: skip
        assert name in train_records[-1]
        assert f"eval_{name}" in records[-1]
    assert (tmp_path / "run" / preference.REFERENCE_CACHE).is_file()


def _units() -> list[Unit]:
    def example(ids: list[int], answer: int) -> TokenizedExample:
        return TokenizedExample(ids, [IGNORE_INDEX] * (len(ids) - answer) + ids[-answer:])

    return [
        Unit(i, {"chosen": example([5, 6, 7, 8 + i], 2), "rejected": example([5, 6, 9, i], 2)})
        for i in range(6)
    ]


def test_reference_logps_are_computed_once_and_read_back(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    forwards = []
    model.get_base_model().model.register_forward_hook(lambda *_: forwards.append(1))
    cache = tmp_path / "run" / preference.REFERENCE_CACHE
    first = pack_units(_units(), 16)
    assert attach_reference_logps(model, [first], cache, 0, 2) == len(forwards) == 2
    values = [s.reference_logp for row in first for s in row.sequences]
    assert all(isinstance(v, float) for v in values)
    # a second epoch / a resumed run: new row objects, packed differently, same content
    again = pack_units(_units(), 8)
    assert attach_reference_logps(model, [again], cache, 0, 2) == 0
    assert len(forwards) == 2
    by_key = {s.key: s.reference_logp for row in first for s in row.sequences}
    assert all(by_key[s.key] == s.reference_logp for row in again for s in row.sequences)


def test_resumed_dpo_run_does_not_recompute_reference(tmp_path, tiny_model_dir, capsys):
    config = _config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1, eval_path=None)
    FineTuner(config).train()
    first = re.search(r"Reference log-probabilities: (\d+) forwards", capsys.readouterr().out)
    assert first and int(first.group(1)) >= 1
    more = _config(tmp_path, tiny_model_dir, max_steps=4, save_steps=1, eval_path=None)
    FineTuner(more).train(resume=True)
    assert "Reference log-probabilities: 0 forwards run" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo", "kto"])
def test_each_objective_trains_through_the_loop(tmp_path, tiny_model_dir, objective):
    config = _config(tmp_path, tiny_model_dir, objective=objective, max_steps=3, beta=0.5)
    results = FineTuner(config).train()
    assert results["steps"] == 3
    assert "eval_rewards/margins" in results


def test_full_fine_tuning_uses_a_frozen_reference(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, method="full", max_steps=3, learning_rate=1e-3)
    results = FineTuner(config).train()
    assert results["eval_rewards/margins"] > 0


def test_dora_dpo_uses_the_base_as_reference_and_learns(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, method="dora", max_steps=6)
    results = FineTuner(config).train()
    assert results["initial_eval_rewards/accuracies"] == 0.0  # adapter off = the reference
    assert results["eval_rewards/margins"] > 0
