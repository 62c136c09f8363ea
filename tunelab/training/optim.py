"""The optimizer: AdamW with weight decay only where it regularises, fused where torch has it.

Decay shrinks weights towards zero; on biases and norm scales that only hurts (a norm's scale
of 1 is its neutral value), so those go in a group without decay, as in most recipes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tunelab.config import FineTuningConfig
from tunelab.training.distributed import is_dtensor

logger = logging.getLogger(__name__)


def parameter_groups(
    model: Any,
    weight_decay: float,
    learning_rate: float | None = None,
    loraplus_lr_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: matrices with ``weight_decay``, and biases,
    norm weights and other 1-D tensors without. With ``loraplus_lr_ratio`` (LoRA+), LoRA's B
    matrices get a group of their own at ``learning_rate`` times the ratio: B starts at zero
    and, the paper shows, learns best with a much larger step than A."""
    decay, no_decay, lora_b = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered:
            no_decay.append(param)
        elif loraplus_lr_ratio and ".lora_b." in lowered:
            lora_b.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if lora_b:
        assert learning_rate is not None and loraplus_lr_ratio is not None
        groups.append(
            {"params": lora_b, "weight_decay": weight_decay,
             "lr": learning_rate * loraplus_lr_ratio}
        )  # fmt: skip
    return [g for g in groups if g["params"]]


def build_optimizer(model: Any, config: FineTuningConfig) -> tuple[torch.optim.Optimizer, str]:
    """The configured optimizer and a sentence saying which implementation runs."""
    groups = parameter_groups(
        model, config.weight_decay, config.learning_rate, config.loraplus_lr_ratio
    )
    device = next(p for g in groups for p in g["params"]).device
    if config.optimizer == "adamw_8bit":
        optimizer, note = _adamw_8bit(groups, config.learning_rate, device)
        if optimizer is not None:
            return optimizer, note
    else:
        note = ""
    if _sharded_and_whole(groups):
        # FSDP's sharded layers beside the whole embeddings and head (full fine-tuning): fused
        # and foreach AdamW take one kind of tensor per call, and fail on the mix
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, foreach=False)
        return optimizer, (note + "AdamW (per tensor: sharded and whole weights)").strip()
    all_fp32 = all(p.dtype == torch.float32 for g in groups for p in g["params"])
    # fused AdamW is one kernel per step over all tensors (CPU since torch 2.4, and CUDA)
    if all_fp32 or device.type == "cuda":
        try:
            optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)
            return optimizer, (note + "AdamW (fused)").strip()
        except (RuntimeError, TypeError):
            pass
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, foreach=True)
    return optimizer, (note + "AdamW (foreach)").strip()


def _sharded_and_whole(groups: list[dict[str, Any]]) -> bool:
    """Whether the parameters mix FSDP-sharded (DTensor) and whole tensors."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # nothing is sharded without a process group
    return len({is_dtensor(p) for g in groups for p in g["params"]}) > 1


def _adamw_8bit(groups: list[dict[str, Any]], lr: float, device: torch.device) -> tuple[Any, str]:
    """bitsandbytes' 8-bit AdamW, or (None, why not) where it cannot run here."""
    try:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, lr=lr)
        # a dry step on a copy proves the kernels exist for this device before training
        probe = torch.zeros(4096, device=device, requires_grad=True)
        probe_optimizer = bnb.optim.AdamW8bit([probe], lr=lr, min_8bit_size=1)
        probe.grad = torch.ones_like(probe)
        probe_optimizer.step()
        return optimizer, "AdamW 8-bit (bitsandbytes)"
    except Exception as exc:  # noqa: BLE001 (any failure means: use the 32-bit optimizer)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        message = (
            f"optimizer adamw_8bit is unavailable on {device.type} ({reason}); "
            "using 32-bit AdamW instead. "
        )
        logger.info("Note: %s", message)
        return None, message
