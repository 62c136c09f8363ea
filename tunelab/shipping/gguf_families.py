"""What differs per model family in a GGUF file, as llama.cpp's convert_hf_to_gguf.py writes it.

Tensor names come from the ``gguf`` package's TensorNameMap (llama.cpp's own table); this module
holds only each family's quirks: llama.cpp's architecture name, whether query/key rows are
permuted for its rotary layout, Gemma's stored ``norm + 1``, and the extra hyperparameters.
Anything a family does that is not handled here is refused, never written half-right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_rotary: bool  # llama.cpp rotates adjacent pairs for these; transformers the halves
    norm_offset: float  # Gemma computes x * (1 + w); llama.cpp stores 1 + w
    extra: Callable[[Any, Any, str], None]  # (writer, config, folder) -> None


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _no_extra(writer: Any, config: Any, folder: str) -> None:
    head_dim = _head_dim(config)
    if head_dim * config.num_attention_heads != config.hidden_size:
        # llama.cpp assumes hidden_size / heads otherwise (Mistral-Nemo-style configs differ)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _qwen2(writer: Any, config: Any, folder: str) -> None:
    if getattr(config, "use_sliding_window", False):
        raise TunelabError(
            f"{folder}/config.json: use_sliding_window is true; llama.cpp's qwen2 runs full "
            "attention, so the file would answer differently. Export with use_sliding_window false."
        )
    _no_extra(writer, config, folder)


def _qwen3(writer: Any, config: Any, folder: str) -> None:
    _qwen2(writer, config, folder)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))


def _gemma(writer: Any, config: Any, folder: str) -> None:
    head_dim = _head_dim(config)
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        raise TunelabError(
            f"{folder}/config.json: query_pre_attn_scalar {scalar} differs from head_dim "
            f"{head_dim}; llama.cpp scales attention by head_dim for this model size."
        )
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)


def _gemma2(writer: Any, config: Any, folder: str) -> None:
    _gemma(writer, config, folder)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _gemma3(writer: Any, config: Any, folder: str) -> None:
    _gemma(writer, config, folder)
    # llama.cpp's gemma3 makes every 6th layer global and the rest sliding
    expected = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    layer_types = list(getattr(config, "layer_types", expected) or expected)
    if layer_types != expected:
        raise TunelabError(
            f"{folder}/config.json: layer_types {layer_types} differ from Gemma 3's pattern "
            "(5 sliding layers, then 1 global) that llama.cpp assumes."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    if local and float(local.get("rope_theta", 1e4)) != 1e4:
        raise TunelabError(
            f"{folder}/config.json: the sliding layers' rope_theta is {local['rope_theta']}; "
            "llama.cpp's gemma3 uses 10000."
        )


def _phi3(writer: Any, config: Any, folder: str) -> None:
    factor = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if factor != 1.0:  # else written with the common hyperparameters
        writer.add_rope_dimension_count(int(_head_dim(config) * factor))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", True, 0.0, _no_extra),
    "MistralForCausalLM": Family("LLAMA", True, 0.0, _no_extra),
    "Qwen2ForCausalLM": Family("QWEN2", False, 0.0, _qwen2),
    "Qwen3ForCausalLM": Family("QWEN3", False, 0.0, _qwen3),
    "Gemma2ForCausalLM": Family("GEMMA2", False, 1.0, _gemma2),
    "Gemma3ForCausalLM": Family("GEMMA3", False, 1.0, _gemma3),
    "Phi3ForCausalLM": Family("PHI3", False, 0.0, _phi3),
}


def global_rope_theta(config: Any) -> float:
    """The rotary base of the (global) attention layers."""
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:
        rope = rope["full_attention"]
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4)))


def rope_type(config: Any) -> str:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = (
        [r.get("rope_type", r.get("type", "default")) for r in rope.values()]
        if isinstance(rope, dict) and "full_attention" in rope
        else [rope.get("rope_type", rope.get("type", "default"))]
    )
    return next((kind for kind in kinds if kind != "default"), "default")
