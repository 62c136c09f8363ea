"""tunelab eval on a preference run: held-out preference accuracy and margin per system."""

from __future__ import annotations

import json

from conftest import preference_pairs, write_jsonl

from tunelab.api import FineTuner
from tunelab.cli import main
from tunelab.config import FineTuningConfig


def test_eval_reports_base_sft_and_tuned_preference_accuracy(tmp_path, tiny_model_dir, capsys):
    pairs = preference_pairs("What is a {}?", count=6)
    held_out = [{**p, "prompt": p["prompt"].replace("What is a", "Define")} for p in pairs]
    train = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    held = write_jsonl(tmp_path / "held.jsonl", held_out)
    sft_data = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    )
    common = dict(
        model_name=str(tiny_model_dir), max_length=64, precision="fp32", lora_dropout=0.0,
        chat_format="plain", plot=False, batch_size=4, logging_steps=1,
        target_modules=["all-linear"], learning_rate=5e-3,
    )  # fmt: skip
    sft = FineTuningConfig(
        dataset_path=str(sft_data), output_dir=str(tmp_path / "sft"), max_steps=2, **common
    )
    FineTuner(sft).train()
    dpo = FineTuningConfig(
        dataset_path=str(train), output_dir=str(tmp_path / "dpo"), objective="dpo", beta=0.5,
        max_steps=10, **common,
    )  # fmt: skip
    FineTuner(dpo).train()
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "dpo"), "--eval-path", str(held),
                 "--sft-run", str(tmp_path / "sft"), "--precision", "fp32"])  # fmt: skip
    assert code == 0
    assert "| tuned | 6 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "dpo" / "eval_preference.json").read_text())
    base, sft, tuned = (report["systems"][k] for k in ("base", "sft", "tuned"))
    assert "reward_accuracy" not in base and base["pairs"] == 6
    assert tuned["reward_accuracy"] >= 0.8 and tuned["reward_margin"] > 0
    assert tuned["logp_margin"] > base["logp_margin"]
    assert set(sft) == set(tuned)
    assert (tmp_path / "dpo" / "eval_preference.md").is_file()
