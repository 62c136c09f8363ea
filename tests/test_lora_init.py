"""EVA and LoftQ initialisations: the numbers they promise, checked on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import bnb_cpu_missing

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig, ineffective_settings
from tunelab.errors import TunelabError
from tunelab.training.batching import collate


def _lora_layers(model):
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})
    }


def _eva_tuner(make_config, **overrides):
    config = make_config(init_lora_weights="eva", target_modules=["all-linear"], **overrides)
    tuner = FineTuner(config)
    rows = tuner.prepare_dataset()
    tuner.prepare_model()
    tuner.initialise_adapters(rows)
    return tuner, rows


def test_eva_a_rows_match_peft_eva_on_the_same_data(make_config):
    from peft import EvaConfig, LoraConfig, get_eva_state_dict, get_peft_model
    from transformers import AutoModelForCausalLM

    tuner, rows = _eva_tuner(make_config)
    config = tuner.config
    # PEFT's EVA used directly: the same rows, batched and collated the same way
    base = AutoModelForCausalLM.from_pretrained(config.model_name, dtype=torch.float32)
    reference = get_peft_model(
        base,
        LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear",
            init_lora_weights="eva", eva_config=EvaConfig(rho=config.eva_rho),
        ),
    )  # fmt: skip
    batches = [
        collate(rows[i : i + config.batch_size], tuner.tokenizer.pad_token_id)
        for i in range(0, len(rows), config.batch_size)
    ]
    expected = get_eva_state_dict(reference, batches, show_progress_bar=False)
    layers = _lora_layers(tuner.model)
    expected = {k.removeprefix("base_model.model."): v for k, v in expected.items()}
    assert set(expected) == set(layers) and len(layers) == 14  # 7 linear layers x 2 blocks
    ranks = set()
    for name, module in layers.items():
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        torch.testing.assert_close(a, expected[name].float(), atol=1e-5, rtol=0)
        assert torch.count_nonzero(b) == 0  # the adapter starts as the identity
        # principal directions: orthonormal rows
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
        ranks.add(a.shape[0])
    # eva_rho 2: the budget of 14 x 8 is shared out by explained variance, up to 16 a layer
    assert sum(m.r["default"] for m in layers.values()) == 14 * config.lora_r
    assert len(ranks) > 1 and max(ranks) <= 2 * config.lora_r


def test_eva_rho_one_keeps_every_rank(make_config):
    tuner, _ = _eva_tuner(make_config, eva_rho=1.0)
    assert {m.r["default"] for m in _lora_layers(tuner.model).values()} == {8}


def test_eva_run_saves_its_ranks_and_reloads(make_config, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(init_lora_weights="eva", target_modules=["all-linear"], max_steps=2)
    tuner = FineTuner(config)
    tuner.train()
    printed = capsys.readouterr().out
    assert "EVA: adapters set from the training data's activations (" in printed
    saved = json.loads((Path(config.output_dir) / "adapter_config.json").read_text())
    trained = _lora_layers(tuner.model)
    assert saved["rank_pattern"] == {
        n: m.r["default"] for n, m in trained.items() if m.r["default"] != config.lora_r
    }
    assert saved["rank_pattern"]  # the ranks did move
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(config.model_name, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, config.output_dir)(input_ids=ids).logits
        torch.testing.assert_close(reloaded, tuner.model.eval()(input_ids=ids).logits)


def test_eva_without_enough_tokens_stops_with_a_clear_error(make_config):
    config = make_config(init_lora_weights="eva", eva_rho=8.0, lora_r=16)
    tuner = FineTuner(config)
    rows = tuner.prepare_dataset()
    tuner.prepare_model()
    from tunelab import lora_init

    with pytest.raises(TunelabError, match=r"did not settle within \d+ forwards .* 128 answer"):
        lora_init.initialize_eva(tuner.model, lora_init.eva_batches(rows[:1], 1, 0, "cpu"), config)
    # the hooks are gone: the model runs as before
    assert not any(m._forward_hooks for m in tuner.model.modules())


def _loftq_tuner(make_config, init):
    config = make_config(
        method="qlora", init_lora_weights=init, target_modules=["all-linear"], lora_alpha=32
    )
    tuner = FineTuner(config)
    rows = tuner.prepare_dataset()
    tuner.prepare_model()
    tuner.initialise_adapters(rows)
    return tuner


@pytest.mark.skipif(bnb_cpu_missing() is not None, reason=str(bnb_cpu_missing()))
def test_loftq_adapter_takes_the_best_rank_r_part_of_the_quantisation_error(make_config):
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file

    tuner = _loftq_tuner(make_config, "loftq")
    original = load_file(str(Path(tuner.config.model_name) / "model.safetensors"))
    layers = _lora_layers(tuner.model)
    assert len(layers) == 14
    plain_total = loftq_total = 0.0
    for name, module in layers.items():
        weight = module.get_base_layer().weight
        dequantized = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
        error = original[name + ".weight"].float() - dequantized
        scaling = module.scaling["default"]
        assert scaling == 4.0  # alpha 32 / r 8: the adapter's update is scaled by 4
        update = scaling * module.lora_B["default"].weight @ module.lora_A["default"].weight
        left = error - update
        # Eckart-Young: the best rank-r approximation leaves the tail singular values
        tail = torch.linalg.svdvals(error)[module.r["default"] :]
        assert float(left.norm()) == pytest.approx(float(tail.norm()), rel=1e-3)
        assert float(left.norm()) < float(error.norm())
        plain_total += float(error.square().sum())
        loftq_total += float(left.square().sum())
    # measured on the tiny model (width 64, r 8): LoftQ leaves about 3/4 of the error
    assert math.sqrt(loftq_total / plain_total) < 0.9


@pytest.mark.skipif(bnb_cpu_missing() is not None, reason=str(bnb_cpu_missing()))
def test_loftq_model_is_closer_to_the_unquantized_one(make_config, capsys):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    loftq = _loftq_tuner(make_config, "loftq")
    assert "the weight error left is" in capsys.readouterr().out
    plain = _loftq_tuner(make_config, "default")
    full = AutoModelForCausalLM.from_pretrained(loftq.config.model_name, dtype=torch.float32)
    with torch.no_grad():
        target = full(input_ids=ids).logits
        loftq_gap = (loftq.model.eval()(input_ids=ids).logits - target).square().mean()
        plain_gap = (plain.model.eval()(input_ids=ids).logits - target).square().mean()
    assert float(loftq_gap) < float(plain_gap)


def test_loftq_needs_the_unquantized_safetensors(tmp_path):
    from tunelab.lora_init import original_weights_file

    with pytest.raises(TunelabError, match=r"has no model.safetensors .* init_lora_weights"):
        original_weights_file(str(tmp_path))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"init_lora_weights": "loftq"}, r"used with method qlora .* this run has method lora\)"),
        (
            {"method": "qlora", "quantization_bits": 8, "init_lora_weights": "loftq"},
            "this run has method qlora, quantization_bits 8",
        ),
        ({"method": "dora", "init_lora_weights": "eva"}, "eva sets up plain LoRA adapters"),
        ({"method": "ia3", "init_lora_weights": "eva"}, "default with method ia3"),
        (
            {"method": "qlora", "objective": "dpo", "init_lora_weights": "loftq"},
            "pissa/olora/loftq start from another model",
        ),
        ({"init_lora_weights": "eva", "eva_rho": 0.5}, "'eva_rho' is 0.5, but it must be at"),
    ],
)
def test_combinations_that_cannot_work_are_refused(values, message):
    with pytest.raises(TunelabError, match=message):
        FineTuningConfig(**values)


def test_combinations_that_work_are_accepted():
    FineTuningConfig(objective="dpo", init_lora_weights="eva")  # B = 0: policy = reference
    FineTuningConfig(method="qlora", init_lora_weights="eva")
    FineTuningConfig(method="qlora", init_lora_weights="loftq")
    warnings = ineffective_settings(FineTuningConfig(eva_rho=3.0))
    assert any(
        "'eva_rho' (3.0) has no effect unless init_lora_weights is eva" in w for w in warnings
    )


def test_eva_run_resumes_with_its_ranks(make_config, capsys):
    overrides = dict(init_lora_weights="eva", target_modules=["all-linear"], save_steps=2)
    first = FineTuner(make_config(max_steps=4, **overrides))
    first.train()
    ranks = {n: m.r["default"] for n, m in _lora_layers(first.model).items()}
    assert len(set(ranks.values())) > 1
    resumed = FineTuner(make_config(max_steps=6, **overrides))
    results = resumed.train(resume=True)
    assert results["steps"] == 6
    # the recomputed EVA gave the checkpoint's shapes, and the checkpoint's values replaced it
    assert {n: m.r["default"] for n, m in _lora_layers(resumed.model).items()} == ranks
    assert any(
        torch.count_nonzero(m.lora_B["default"].weight)
        for m in _lora_layers(resumed.model).values()
    )
