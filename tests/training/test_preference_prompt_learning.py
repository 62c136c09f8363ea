"""Prompt and prefix tuning ignore position_ids: each answer must be scored in a row of its own.

A preference unit lays its chosen and rejected answers one after the other in one row, kept
apart by restarting positions. PEFT's prompt-learning adapters drop position_ids (they prepend
virtual tokens), so in one row the rejected answer attended to the chosen one: its
log-probability was that of a different text, in training, in the reference pass and in eval.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.data.tokenize import TokenizedExample
from tunelab.training.logprobs import sequence_logprobs
from tunelab.training.preference import Unit, _batch, ignores_position_ids, pack_units


def _unit(index, chosen, rejected):
    def example(ids):
        return TokenizedExample(list(ids), [-100] * 3 + list(ids)[3:])

    return Unit(index, {"chosen": example(chosen), "rejected": example(rejected)})


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "lora"])
def test_each_answer_scores_as_it_would_alone(tiny_model_dir, method):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.evaluation.preference import pair_logps
    from tunelab.training.objectives import Settings
    from tunelab.training.preference import StepStats, preference_loss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = {
        "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "lora": LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]),
    }[method]
    model = get_peft_model(base, config).eval()
    assert ignores_position_ids(model) == (method != "lora")
    units = [_unit(0, range(10, 22), range(30, 45)), _unit(1, range(50, 58), range(60, 80))]
    alone = {}  # each answer in a batch of its own: nothing else to attend to
    with torch.no_grad():
        for unit in units:
            for side, example in unit.sides.items():
                row = pack_units([Unit(unit.index, {side: example})], 512, packing=False)
                batch, index, sequences = _batch(row, 0, "cpu")
                alone[(unit.index, side)] = float(sequence_logprobs(model, batch, index, 1)[0][0])
    with torch.no_grad():
        chosen, rejected = pair_logps(model, units)  # eval: units packed into one row
        stats = StepStats()
        rows = pack_units(units, 512, packing=False)  # training: a unit per row
        settings = Settings("simpo", 2.0, 0.0, 0.5, 0.0, 1.0, 1.0)
        preference_loss(model, rows, settings, 0, "cpu", 2, 1, stats)
    for i in range(2):
        assert chosen[i] == pytest.approx(alone[(i, "chosen")], abs=1e-4)
        assert rejected[i] == pytest.approx(alone[(i, "rejected")], abs=1e-4)
    trained = stats.metrics()
    counts = [12 - 3, 15 - 3, 8 - 3, 20 - 3]  # target tokens: the first 3 of each are prompt
    mean_rejected = (alone[(0, "rejected")] / counts[1] + alone[(1, "rejected")] / counts[3]) / 2
    assert trained["logps/rejected"] == pytest.approx(mean_rejected, abs=1e-4)
