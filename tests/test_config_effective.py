"""The config is decided once, in validation, and never changes afterwards (a frozen schema)."""

from __future__ import annotations

import dataclasses

import pytest

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig, ineffective_settings


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


def test_packing_is_decided_in_validation_with_a_warning():
    config = FineTuningConfig(method="prompt_tuning", packing=True)
    assert config.packing is False
    warnings = ineffective_settings(config)
    assert any("packing" in w and "prompt_tuning" in w for w in warnings), warnings
    assert not any("packing" in w for w in ineffective_settings(FineTuningConfig()))
    # a derived config is validated again and keeps the decided value
    assert dataclasses.replace(config, lora_r=4).packing is False


def test_the_config_cannot_change_after_validation():
    config = FineTuningConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.packing = False  # type: ignore[misc]
