"""Mixed precision for training: a bf16 (or fp16) base with fp32 trainable parameters.

The frozen base weights are stored in bf16. Trainable parameters (LoRA matrices, or everything
in full fine-tuning) stay fp32, so AdamW's small updates are not rounded away. Under autocast
their matmuls run in bf16 on a bf16 copy made once per forward, and PEFT's cast of every
activation to fp32 (a copy per LoRA layer, both ways) is switched off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


@contextlib.contextmanager
def mixed_precision(model: Any, device: str, precision: str) -> Iterator[None]:
    """Run the forward (and so the backward) of ``model`` in ``precision``; fp32 is a no-op."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    with no_input_casting(model), torch.autocast(device_type, dtype=dtype):
        yield


@contextlib.contextmanager
def no_input_casting(model: Any) -> Iterator[None]:
    """Switch off PEFT's cast of adapter inputs to the adapter's dtype, on the layers that have
    it. (peft.helpers.disable_input_dtype_casting assumes every tuner layer has the switch;
    IA3's layers do not, and it fails on them.)"""
    saved = []
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            saved.append((module, module.cast_input_dtype_enabled))
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for module, value in saved:
            module.cast_input_dtype_enabled = value


@contextlib.contextmanager
def backward_precision(model: Any, precision: str) -> Iterator[None]:
    """Keep PEFT's input casting off during backward too: with gradient checkpointing, layers
    re-run their forward there, and must recompute exactly what the forward saved."""
    if autocast_dtype(precision) is None:
        yield
        return
    with no_input_casting(model):
        yield


def grad_scaler(device: str, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    if precision == "fp16":
        return torch.amp.GradScaler("cuda" if str(device).startswith("cuda") else "cpu")
    return None
