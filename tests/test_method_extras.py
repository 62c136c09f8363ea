"""LoRA+, PEFT's PiSSA/OLoRA initialisations and NEFTune do what they claim."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError
from tunelab.method_comparison import compare_methods
from tunelab.training.neftune import neftune
from tunelab.training.optim import build_optimizer


def _lora_model(tiny_model_dir, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora))


def test_loraplus_gives_b_matrices_their_own_learning_rate(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    config = FineTuningConfig(learning_rate=2e-4, loraplus_lr_ratio=16)
    optimizer, _ = build_optimizer(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], []).extend(names[id(p)] for p in group["params"])
    assert sorted(by_lr) == [2e-4, pytest.approx(3.2e-3)]
    fast = by_lr[max(by_lr)]
    assert fast and all(".lora_B." in n for n in fast)
    assert all(".lora_A." in n for n in by_lr[2e-4])
    plain, _ = build_optimizer(model, FineTuningConfig(learning_rate=2e-4))
    assert {g["lr"] for g in plain.param_groups} == {2e-4}


def test_neftune_adds_bounded_noise_in_training_only(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    embeddings = model.get_input_embeddings()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    clean = embeddings(ids)
    with neftune(model, 5.0):
        model.train()
        noisy = embeddings(ids)
        model.eval()
        evaluated = embeddings(ids)
    bound = 5.0 / math.sqrt(ids.shape[1] * clean.shape[-1])
    difference = (noisy - clean).abs()
    assert 0 < float(difference.max()) <= bound + 1e-7
    assert float(difference.mean()) > bound / 4  # uniform over the whole range, not tiny
    assert torch.equal(evaluated, clean)
    model.train()
    assert torch.equal(embeddings(ids), clean)  # the hook is gone after the block


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_runs_save_plain_lora_for_the_original_base(make_config, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(init_lora_weights=init, max_steps=2)
    tuner = FineTuner(config)
    tuner.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        trained = tuner.model.float()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(config.model_name, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, config.output_dir)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)
    run = Path(config.output_dir)
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["r"] == 2 * config.lora_r and (run / "initial_adapter").is_dir()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "ia3", "loraplus_lr_ratio": 16.0}, "null with method ia3"),
        ({"loraplus_lr_ratio": -1.0}, "positive ratio"),
        ({"method": "prompt_tuning", "init_lora_weights": "pissa"}, "default with method"),
        ({"objective": "dpo", "init_lora_weights": "pissa"}, "with objective dpo"),
        ({"objective": "dpo", "neftune_noise_alpha": 5.0}, "NEFTune is an SFT technique"),
        ({"init_lora_weights": "corda"}, "allowed values are 'default', 'gaussian'"),
    ],
)
def test_extras_are_validated(values, message):
    with pytest.raises(TunelabError, match=message):
        FineTuningConfig(**values)


def test_methods_compare_runs_the_extras_as_lora_variants(make_config, tmp_path):
    config = make_config(eval_path=str(tmp_path / "train.jsonl"), max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    rows = compare_methods(path, ["lora+", "neftune"], out_dir=tmp_path / "cmp")
    assert [r["method"] for r in rows] == ["lora+", "neftune"]
    assert all("error" not in r for r in rows)
    saved = yaml.safe_load((tmp_path / "cmp" / "lora+" / "tunelab_config.yaml").read_text())
    assert saved["loraplus_lr_ratio"] == 16.0 and saved["method"] == "lora"
