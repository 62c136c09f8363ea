"""The fast-path plan: the family table, the config keys that turn pieces off, and the one
line `tunelab train` prints."""

import pytest

from tunelab.config import FineTuningConfig


def test_fast_path_config_turns_pieces_off_and_the_plan_says_why():
    from tunelab.errors import TunelabError
    from tunelab.training.families import plan_fast_path

    class Llama:
        config = type("C", (), {"model_type": "llama"})()

    plan = plan_fast_path(Llama())
    assert plan.summary() == (
        "Fast path (llama): attention, loss, rotary, norm, lora_forward, dropout; nothing stock."
    )
    off = plan_fast_path(Llama(), enabled=True, disabled=("loss", "rotary"))
    assert off.summary() == (
        "Fast path (llama): attention, norm, lora_forward, dropout; "
        "stock: loss (fast_path_disable); rotary (fast_path_disable)."
    )
    assert not any(plan_fast_path(Llama(), enabled=False).fast.values())
    unknown = plan_fast_path(type("M", (), {"config": type("C", (), {"model_type": "mamba"})()})())
    assert unknown.why["attention"] == "family not in tunelab's proven table"
    with pytest.raises(TunelabError, match="'fast_path_disable' names 'rope'.*allowed: attention"):
        FineTuningConfig(fast_path_disable=["rope"])


def test_train_prints_which_pieces_run_fast_and_which_stock(make_config, capsys):
    from tunelab.api import FineTuner

    FineTuner(make_config(max_steps=1, fast_path_disable=["rotary"])).train()
    lines = [line for line in capsys.readouterr().out.splitlines() if "Fast path" in line]
    assert lines == [
        "Fast path (llama): attention, loss, norm, lora_forward; stock: rotary "
        "(fast_path_disable); dropout (lora_dropout is 0 or no adapter dropout)."
    ]
