"""LoRA initialisations that need more than the adapter's own weights: EVA (from the training
data's activations) and LoftQ (from the original weights of a quantized base).

EVA is PEFT's (``get_eva_state_dict`` / ``initialize_lora_eva_weights``), fed with the run's
own packed rows. LoftQ follows PEFT's ``replace_lora_weights_loftq`` step for step (the same
safetensors reader, bitsandbytes dequantisation and low-rank split of the quantisation
error), with two differences: it computes on the weight's device, where PEFT 0.21 always
moves to CUDA/XPU and so cannot run on a CPU, and it divides out LoRA's scaling
(alpha / r), which PEFT leaves in (huggingface/peft#1982), so that the adapter's update at
the start is the low-rank part of the quantisation error and not a multiple of it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError

# forwards EVA's incremental SVD may take before tunelab gives up: a real model settles
# within one pass over its data; a tiny random one (near-equal variances) needs ~80 of 2
EVA_MIN_FORWARDS = 500
EVA_MAX_PASSES = 5


def eva_batches(rows: list[Any], batch_size: int, pad_token_id: int, device: str) -> list[dict]:
    """The training rows as EVA's data loader: collated batches (input_ids, labels and
    position_ids, each [batch, width]) in the rows' order, on ``device``."""
    from tunelab.training.batching import collate

    batches = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_token_id)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def initialize_eva(model: Any, batches: list[dict], config: FineTuningConfig) -> str:
    """Set the LoRA A matrices of ``model`` (a PEFT model made with init_lora_weights eva)
    to the principal directions of each layer's inputs on ``batches`` (PEFT's EVA), and
    redistribute the ranks by explained variance; returns a line saying what was done.

    Only answer tokens count (labels != -100, PEFT's ``use_label_mask``); packed sequences
    keep their own positions, as in training. Raises TunelabError when there is no data or
    the SVD has not converged after EVA_MAX_PASSES passes over it."""
    from peft import initialize_lora_eva_weights

    if not batches:
        raise TunelabError(
            "init_lora_weights eva computes the adapters from the training data, and there "
            "is none. Give dataset_path rows, or use init_lora_weights default."
        )
    before = _ranks(model)
    forwards = {"n": 0}
    limit = max(EVA_MIN_FORWARDS, EVA_MAX_PASSES * len(batches))

    def forward(model: Any, inputs: dict) -> Any:
        forwards["n"] += 1
        if forwards["n"] > limit:
            raise TunelabError(
                f"init_lora_weights eva: the SVD of the layer inputs did not settle within "
                f"{limit} forwards of the {len(batches)} training batches (each "
                f"batch needs at least lora_r x eva_rho = "
                f"{round(config.lora_r * config.eva_rho)} answer tokens). Use more or longer "
                "training rows, a larger batch_size, or init_lora_weights default."
            )
        return model(
            input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False
        )

    skipped = io.StringIO()  # PEFT prints a line for each batch too small to use
    try:
        with contextlib.redirect_stdout(skipped):
            initialize_lora_eva_weights(
                model,
                dataloader=batches,
                forward_fn=forward,
                # every process holds all the rows: each computes the same result on its own
                gather_distributed_inputs=False,
                show_progress_bar=False,
            )
    finally:
        _remove_eva_hooks(model)
    after = _ranks(model)
    small = skipped.getvalue().count("skipping SVD")
    note = (
        f" {small} layer inputs had fewer tokens than components and were skipped." if small else ""
    )
    return (
        f"EVA: adapters set from the training data's activations ({forwards['n']} forwards); "
        f"ranks {min(after.values(), default=0)}-{max(after.values(), default=0)} over "
        f"{len(after)} layers (was {config.lora_r} on {len(before)}; eva_rho "
        f"{config.eva_rho} lets a layer take up to {round(config.lora_r * config.eva_rho)})." + note
    )


def _ranks(model: Any) -> dict[str, int]:
    """Rank of each LoRA layer of the default adapter."""
    return {
        name: module.r["default"]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})
    }


def _remove_eva_hooks(model: Any) -> None:
    """Take off EVA's forward hooks when it stopped half-way (PEFT removes them on success)."""
    from peft.tuners.lora.eva import _Hook

    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _Hook):
                del module._forward_hooks[key]


def original_weights_file(model_location: str) -> Path:
    """The safetensors file (or shard index) holding the model's unquantized weights."""
    folder = Path(model_location)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / "model.safetensors"
    raise TunelabError(
        f"init_lora_weights loftq reads the unquantized weights from the model folder, and "
        f"{folder} has no model.safetensors (nor a sharded index). Convert the model to "
        "safetensors, or use init_lora_weights default."
    )


@torch.no_grad()
def initialize_loftq(model: Any, model_location: str) -> str:
    """Set each 4-bit LoRA layer's adapter to the best rank-r approximation of its
    quantisation error: scaling * B @ A = truncated SVD of (W - dequantize(quantize(W))),
    W read from the model folder's safetensors. ``model`` is a PEFT model on a bitsandbytes
    4-bit base. Returns a line giving the error left, relative to plain quantisation."""
    import bitsandbytes.functional as bnb_functional
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    loader = _SafetensorLoader(model, str(original_weights_file(model_location)))
    prefix = "base_model.model."
    quantized_error = adapted_error = 0.0
    layers = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or "default" not in module.r:
            continue
        original = loader.get_tensor(name[len(prefix) :] + ".weight")
        weight = module.get_base_layer().weight
        original = original.to(device=weight.device, dtype=torch.float32)
        dequantized = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
        residual = original - dequantized
        split = _low_rank_decomposition(residual, reduced_rank=module.r["default"])
        # scaling * B @ A must equal L @ R: each factor takes the square root of 1 / scaling
        root = module.scaling["default"] ** 0.5
        lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
        lora_a.data = (split["R"] / root).to(lora_a.dtype).contiguous()
        lora_b.data = (split["L"] / root).to(lora_b.dtype).contiguous()
        quantized_error += float(residual.square().sum())
        adapted_error += float((residual - split["L"] @ split["R"]).square().sum())
        layers += 1
    if not layers:
        raise TunelabError(
            "init_lora_weights loftq found no 4-bit LoRA layer to initialise; it needs method "
            "qlora with quantization_bits 4 and target_modules naming linear layers."
        )
    share = (adapted_error / quantized_error) ** 0.5 if quantized_error else 0.0
    return (
        f"LoftQ: {layers} adapters start as the low-rank part of their layer's 4-bit "
        f"quantisation error; the weight error left is {share:.1%} of plain quantisation's."
    )
