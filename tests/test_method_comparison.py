import json

import pytest
import yaml

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.method_comparison import compare_methods


@pytest.fixture
def config_file(make_config, tmp_path):
    config = make_config(eval_path=str(tmp_path / "train.jsonl"), max_steps=3)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def test_compare_trains_each_method_on_the_same_budget(config_file, tmp_path, capsys):
    rows = compare_methods(config_file, ["lora", "ia3", "prompt_tuning"], out_dir=tmp_path / "cmp")
    assert [r["method"] for r in rows] == ["lora", "ia3", "prompt_tuning"]
    lora, ia3, prompt = rows
    assert lora["trainable_parameters"] == 3584 and ia3["trainable_parameters"] == 192
    # same token budget: prompt tuning runs unpacked, with more steps for about as many tokens
    assert abs(prompt["train_tokens"] - lora["train_tokens"]) / lora["train_tokens"] < 0.5
    assert all(r["eval_loss"] < r["initial_eval_loss"] for r in rows)
    saved = json.loads((tmp_path / "cmp" / "methods_compare.json").read_text())
    assert saved == rows
    table = (tmp_path / "cmp" / "methods_compare.md").read_text()
    assert table.startswith("| method | trainable | share | peak MiB | tokens/s")
    assert "| ia3 | 192 |" in table


def test_compare_errors(config_file, tmp_path, capsys):
    with pytest.raises(TunelabError, match=r"unknown method 'lorra'.*Did you mean 'lora'"):
        compare_methods(config_file, ["lorra"])
    assert main(["methods", "compare", str(config_file), "--set", "eval_path=null"]) == 2
    assert "methods compare needs eval_path" in capsys.readouterr().err
