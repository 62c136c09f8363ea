"""The config is decided once, in validation, and never changes afterwards (a frozen schema)."""

from __future__ import annotations

import dataclasses

import pytest

from tunelab.api import FineTuner
from tunelab.config import (
    FineTuningConfig,
    config_from_dict,
    config_notes,
    ineffective_settings,
    load_config,
)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_prompt_method_run_resumes_with_its_own_config(make_config, tmp_path, method):
    # the run's saved config says what it trained with (one example per row); resuming with
    # the very config it started from must be accepted, not refused over packing
    config = make_config(method=method, num_virtual_tokens=4, max_steps=4, save_steps=2)
    FineTuner(config).train()
    saved = (tmp_path / "run" / "tunelab_config.yaml").read_text()
    assert "packing: false" in saved
    (tmp_path / "run" / "results.json").unlink()  # as after a crash past the last checkpoint
    again = make_config(method=method, num_virtual_tokens=4, max_steps=6, save_steps=2)
    results = FineTuner(again).train(resume=True)
    assert results["steps"] == 6


def test_packing_is_decided_in_validation_with_a_warning_where_the_user_set_it(tmp_path):
    # left at its default: a note; written in the config (tunelab init writes every key): a
    # warning naming the key, why, and what to write instead
    by_default = config_from_dict({"method": "prompt_tuning"})
    assert by_default.packing is False
    assert not any("packing" in w for w in ineffective_settings(by_default))
    assert config_notes(by_default) == [
        "packing is false in this run (method prompt_tuning prepends its virtual tokens to "
        "each sequence and ignores position_ids, so packed examples would see each other: one "
        "example per row)."
    ]
    path = tmp_path / "run.yaml"
    path.write_text("method: prefix_tuning\npacking: true\n")
    written = load_config(path)
    assert written.packing is False and config_notes(written) == []
    [warning] = [w for w in ineffective_settings(written) if "packing" in w]
    assert warning.startswith(
        "config key 'packing' (True) cannot take effect: method prefix_tuning"
    )
    assert warning.endswith("packing is False in this run. Set packing: false to say so.")
    # written as false: nothing to say
    quiet = config_from_dict({"method": "prompt_tuning", "packing": False})
    assert config_notes(quiet) == [] and not any(
        "packing" in w for w in ineffective_settings(quiet)
    )
    # a derived config is validated again and keeps the decided value
    assert dataclasses.replace(written, lora_r=4).packing is False
    assert config_from_dict({"packing": True}).packing is True  # other methods pack


def test_the_config_cannot_change_after_validation():
    config = FineTuningConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.packing = False  # type: ignore[misc]


def test_a_run_whose_family_decided_target_modules_resumes(make_config, tmp_path, tiny_model_dir):
    # GPT-2 has no q_proj/v_proj: the default target_modules become c_attn once the model is
    # known (a new config, saved with the run); resuming with the same config must compare
    # like with like
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128)
    )
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    FineTuner(make_config(model_name=str(base), max_steps=2, save_steps=1)).train()
    saved = (tmp_path / "run" / "tunelab_config.yaml").read_text()
    assert "target_modules:\n- c_attn\n" in saved
    (tmp_path / "run" / "results.json").unlink()
    again = make_config(model_name=str(base), max_steps=3, save_steps=1)
    assert again.target_modules == ["q_proj", "v_proj"]
    assert FineTuner(again).train(resume=True)["steps"] == 3
