"""The memory model against what really happens: autograd's saved tensors per decoder layer
(exact, fast), and the peak of tunelab's real training loop on this machine (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.planning.architecture import count_parameters, describe
from tunelab.planning.memory import TrainingSetup, estimate_memory, layer_activation_bytes

HERE = Path(__file__).parent
SMOLLM_SHAPES = dict(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=512,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def _saved_bytes(config_path: Path, setup: TrainingSetup, layers: int) -> int:
    """Bytes of the tensors autograd saves in tunelab's training forward (bf16 autocast, fp32
    LoRA, the training step's own layers, loss on completions), parameters excluded."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.config import FineTuningConfig
    from tunelab.training.loop import training_mode
    from tunelab.training.loss import causal_lm_loss_sum
    from tunelab.training.precision import mixed_precision

    values = json.loads(config_path.read_text()) | {"num_hidden_layers": layers}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    lora = peft.LoraConfig(
        r=setup.lora_r, target_modules=setup.target_modules, lora_dropout=setup.lora_dropout
    )
    model = peft.get_peft_model(model, lora, autocast_adapter_dtype=True).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows, length = setup.batch_size, setup.max_length
    ids = torch.randint(0, values["vocab_size"], (rows, length))
    positions = torch.arange(length).repeat(rows, 1)  # the worst case: examples of max_length
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = {"input_ids": ids, "labels": ids, "position_ids": positions}
    with training_mode(model, FineTuningConfig(packing=True)):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with mixed_precision(model, "cpu", "bf16"):
                causal_lm_loss_sum(model, batch)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("targets", "dropout"),
    [
        (["q_proj", "v_proj"], 0.0),
        (["q_proj", "v_proj"], 0.1),
        (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 0.1),
    ],
)
def test_layer_activations_match_autograd(tmp_path, targets, dropout):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMOLLM_SHAPES | {"num_hidden_layers": 2}))
    setup = TrainingSetup(
        target_modules=targets, lora_dropout=dropout, batch_size=2, max_length=128
    )
    arch = describe(str(path))
    params = count_parameters(arch, "lora", setup.lora_r, targets)
    # one more layer adds one layer's activations (layer 0 differs: its input needs no grad)
    measured = _saved_bytes(path, setup, 3) - _saved_bytes(path, setup, 2)
    predicted = layer_activation_bytes(arch, params, setup) * setup.tokens
    assert predicted == pytest.approx(measured, rel=0.05)


def _measure(settings: dict) -> dict:
    run = subprocess.run(
        [sys.executable, "-W", "ignore", str(HERE / "peak_memory_run.py"), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(lines[0][len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        dict(batch_size=2, max_length=256),
        dict(batch_size=4, max_length=512),
        dict(
            batch_size=2,
            max_length=512,
            lora_r=16,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
    ],
)
def test_predicted_peak_within_15_percent_of_measured(tmp_path, overrides):
    """Two steps of tunelab's real loop on the default model (bf16 on this CPU); the peak
    resident-set increase against the estimate for the same settings."""
    import random

    random.seed(0)
    words = "alpha beta gamma delta kernel compiler byte network memory socket thread".split()
    rows = [
        {
            "prompt": " ".join(random.choices(words, k=8)),
            "completion": " ".join(random.choices(words, k=25)),
        }
        for _ in range(160)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = (
        dict(
            model_name="smollm2-135m-instruct",
            dataset_path=str(data),
            output_dir=str(tmp_path / "run"),
            max_steps=2,
            gradient_accumulation_steps=1,
            precision="bf16",
            dedup_exact=False,
            dedup_near_threshold=None,
        )
        | overrides
    )
    measured = _measure(dict(settings))
    setup = TrainingSetup(
        lora_r=overrides.get("lora_r", 8),
        target_modules=overrides.get("target_modules", ["q_proj", "v_proj"]),
        batch_size=overrides["batch_size"],
        max_length=overrides["max_length"],
        loss_fraction=measured["loss_fraction"],
        context=measured["context"],
    )
    arch = describe("smollm2-135m")
    params = count_parameters(arch, "lora", setup.lora_r, setup.target_modules)
    predicted = estimate_memory(arch, params, setup).total
    ratio = predicted / measured["peak_bytes"]
    print(
        f"{overrides} (context {measured['context']}): predicted {predicted / 2**20:.0f} MiB, "
        f"measured "
        f"{measured['peak_bytes'] / 2**20:.0f} MiB, ratio {ratio:.3f}"
    )
    assert ratio == pytest.approx(1.0, abs=0.15)
