"""A leaner forward for plain LoRA layers during training.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the scaling and the sum are
two more passes over the layer's output, and inverted dropout two more over its input (the
0/1 mask cast to the activation dtype, then the 1/(1-p) scale), each replayed in the backward.
Here the sum and both scales go into the last matrix multiplication (``addmm`` with
``alpha = scaling / (1 - p)``, exact since the adapter is linear), and dropout is one
multiplication by :func:`tunelab.training.dropout.keep_mask`, as FastDropout's.
Only vanilla LoRA with one active adapter on an ``nn.Linear`` takes this path; DoRA, LoRA
biases, merged or disabled adapters and mixed-adapter batches keep PEFT's forward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.training.dropout import FastDropout, keep_mask
from tunelab.training.patching import replaced_forwards


def _eligible(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if type(module) is not Linear or not isinstance(module.base_layer, nn.Linear):
        return False
    names = list(module.lora_A.keys())
    if len(names) != 1 or names[0] in getattr(module, "lora_variant", {}):
        return False
    if getattr(module, "lora_bias", {}).get(names[0], False):
        return False
    dropout = module.lora_dropout[names[0]]
    return type(dropout) in (nn.Dropout, nn.Identity, FastDropout)


def _same_dtypes(module: Any, x: torch.Tensor) -> bool:
    """Under autocast every matmul runs in one dtype; without it, input, base and adapter
    weights must already agree (PEFT casts between them; this path does not)."""
    if torch.is_autocast_enabled(x.device.type):
        return True
    (name,) = module.lora_A.keys()
    dtypes = {x.dtype, module.base_layer.weight.dtype, module.lora_A[name].weight.dtype}
    return len(dtypes | {module.lora_B[name].weight.dtype}) == 1


def lora_linear_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + scaling * B(A(dropout(x)))`` for one active vanilla adapter."""
    (name,) = module.lora_A.keys()
    result = module.base_layer(x)
    dropout = module.lora_dropout[name]
    p = getattr(dropout, "p", 0.0) if dropout.training else 0.0
    if p > 0:
        x = x * keep_mask(x.shape, p, x.dtype, x.device)  # the 1/(1-p) goes into addmm's alpha
    down = F.linear(x, module.lora_A[name].weight)
    flat = result.reshape(-1, result.shape[-1])
    out = torch.addmm(
        flat,
        down.reshape(-1, down.shape[-1]),
        module.lora_B[name].weight.t(),
        alpha=module.scaling[name] / (1.0 - p),
    )
    return out.view(result.shape)


def lean_lora_forward(model: Any) -> AbstractContextManager[int]:
    """Give every eligible LoRA layer :func:`lora_linear_forward` for the run (falling back to
    PEFT's own forward whenever the layer is merged, disabled, switched to another adapter or
    called with extra arguments); yields how many were switched, and restores them after."""

    def make_forward(module: Any) -> Any:  # a PEFT LoRA layer: its adapters are read by name
        if not _eligible(module):
            return None
        original = module.forward

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if (
                args
                or kwargs
                or module.disable_adapters
                or module.merged
                or list(module.active_adapters) != list(module.lora_A.keys())
                or not _same_dtypes(module, x)
            ):
                return original(x, *args, **kwargs)
            return lora_linear_forward(module, x)

        return forward

    return replaced_forwards(model, make_forward)
