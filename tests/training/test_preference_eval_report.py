"""A preference run reports its evaluation in TRL's reward metrics, never as a perplexity."""

from __future__ import annotations

import re

from conftest import write_jsonl

from tunelab.api import FineTuner
from tunelab.cli import _report
from tunelab.config import FineTuningConfig
from tunelab.training.preference import format_eval_metrics

PAIRS = [
    {"prompt": f"What is a {term}?", "chosen": good, "rejected": bad}
    for term, good, bad in [
        ("compiler", "translates source code", "bakes bread daily"),
        ("byte", "eight bits", "a small dog"),
        ("kernel", "core of an operating system", "a corn seed only"),
        ("cache", "a fast store of data", "a pirate treasure"),
    ]
]


def test_format_eval_metrics_uses_trl_names():
    metrics = {"rewards/accuracies": 0.75, "rewards/margins": 0.0123, "rewards/chosen": 1.0}
    assert format_eval_metrics(0.69314, metrics) == (
        "eval loss 0.6931, rewards/accuracies 0.7500, rewards/margins 0.0123"
    )
    kto = {"eval_rewards/margins": -0.5, "eval_kl": 0.25}
    assert format_eval_metrics(0.5, kto, prefix="eval_") == (
        "eval loss 0.5000, rewards/margins -0.5000, kl 0.2500"
    )


def test_dpo_run_prints_reward_metrics_not_perplexity(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = FineTuningConfig(
        model_name=str(tiny_model_dir), dataset_path=str(train), eval_path=str(train),
        output_dir=str(tmp_path / "run"), objective="dpo", max_steps=2, batch_size=4,
        max_length=64, precision="fp32", chat_format="plain", eval_each_epoch=False,
        plot=False, eval_steps=2,
    )  # fmt: skip
    results = FineTuner(config).train()
    assert "eval_perplexity" not in results
    assert 0 <= results["eval_rewards/accuracies"] <= 1
    _report(results, config.output_dir)
    out = capsys.readouterr().out
    assert "perplexity" not in out
    # the loop's lines at step 0 (the base model) and at the evaluation step
    assert re.search(r"step 0: eval loss [\d.]+, rewards/accuracies 0\.0000, rewards/margins "
                     r"-?0\.0000 \(base model\)", out)  # fmt: skip
    assert re.search(r"step 2: eval loss [\d.]+, rewards/accuracies [\d.]+, rewards/margins", out)
    final = (
        f"Eval loss {results['eval_loss']:.4f}, rewards/accuracies "
        f"{results['eval_rewards/accuracies']:.4f}, rewards/margins "
        f"{results['eval_rewards/margins']:.4f} (base model: loss "
        f"{results['initial_eval_loss']:.4f}, rewards/accuracies 0.0000"
    )
    assert final in out
