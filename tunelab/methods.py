"""Attach a parameter-efficient method (LoRA through PEFT) to a base model."""

from __future__ import annotations

from typing import Any

from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError


def linear_module_suffixes(names: list[str], model: Any = None) -> list[str]:
    """The distinct last components of module names (what target_modules may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n in names if n})


def check_target_modules(config: FineTuningConfig, module_names: list[str]) -> None:
    """Fail early when a target module does not exist in the model, listing the ones that do."""
    if config.target_modules == ["all-linear"]:
        return
    suffixes = set(linear_module_suffixes(module_names))
    missing = [t for t in config.target_modules if t not in suffixes]
    if missing:
        from tunelab.errors import did_you_mean

        hint = did_you_mean(missing[0], suffixes)
        candidates = sorted(s for s in suffixes if s.endswith("proj") or "attn" in s or "fc" in s)
        raise TunelabError(
            f"config key 'target_modules' names {', '.join(map(repr, missing))}, which the model "
            f"'{config.model_name}' does not have.{hint} Its module names include: "
            f"{', '.join(candidates or sorted(suffixes)[:20])}; or use ['all-linear']."
        )


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def format_trainable(model: Any) -> str:
    """The seed's line: 'Trainable parameters: 460,800 (0.34%)'."""
    trainable, total = count_parameters(model)
    return f"Trainable parameters: {trainable:,} ({trainable / total:.2%})"


def apply_lora(model: Any, config: FineTuningConfig) -> Any:
    """Wrap ``model`` with LoRA adapters; the base stays frozen in its dtype while the adapter
    weights are kept in fp32 (PEFT's autocast_adapter_dtype), so bf16 bases train stably."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules
        if config.target_modules != ["all-linear"]
        else "all-linear",
        bias="none",
    )
    return get_peft_model(model, lora, autocast_adapter_dtype=True)
