"""QLoRA with DPO: the 4-bit base with its adapter off is the reference, and a short run on
the tiny model learns the preference."""

from __future__ import annotations

import pytest
import torch
from conftest import PREFERENCE_TERMS, bnb_cpu_missing, write_jsonl

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig
from tunelab.methods import quantization_config

PAIRS = PREFERENCE_TERMS


def _config(tmp_path, tiny_model_dir, **overrides) -> FineTuningConfig:
    def rows(template):
        return [
            {"prompt": template.format(t), "chosen": good, "rejected": bad}
            for t, (good, bad) in PAIRS.items()
        ]

    values = dict(
        model_name=str(tiny_model_dir), objective="dpo", method="qlora", beta=0.5,
        dataset_path=str(write_jsonl(tmp_path / "pairs.jsonl", rows("What is a {}?"))),
        eval_path=str(write_jsonl(tmp_path / "held_out.jsonl", rows("Define {} please."))),
        output_dir=str(tmp_path / "run"), learning_rate=5e-3, max_steps=12, batch_size=4,
        max_length=64, precision="fp32", lora_dropout=0.0, chat_format="plain",
        eval_each_epoch=False, plot=False, target_modules=["all-linear"],
    )  # fmt: skip
    values.update(overrides)
    return FineTuningConfig(**values)


def test_qlora_dpo_config_builds_an_nf4_base(tmp_path, tiny_model_dir):
    """The part that needs no 4-bit kernel: the config is accepted and asks for NF4."""
    pytest.importorskip("bitsandbytes")
    config = _config(tmp_path, tiny_model_dir)
    quantization = quantization_config(config, torch.float32)
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"


@pytest.mark.skipif(bnb_cpu_missing() is not None, reason=str(bnb_cpu_missing()))
def test_qlora_dpo_run_learns_with_the_4bit_base_as_reference(tmp_path, tiny_model_dir):
    from bitsandbytes.nn import Linear4bit

    tuner = FineTuner(_config(tmp_path, tiny_model_dir))
    results = tuner.train()
    assert any(isinstance(m, Linear4bit) for m in tuner.model.modules())
    # step 0: the adapter is the identity, so the policy is the reference exactly
    assert results["initial_eval_rewards/accuracies"] == 0.0
    assert abs(results["initial_eval_rewards/margins"]) < 1e-5
    assert results["initial_eval_loss"] == pytest.approx(0.693147, abs=1e-4)
    assert results["eval_rewards/accuracies"] >= 0.75
    assert results["eval_rewards/margins"] > 0
    assert results["eval_loss"] < results["initial_eval_loss"]
