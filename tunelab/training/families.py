"""Which of tunelab's training-time replacements serve which model family, and why.

tunelab trains faster by replacing pieces of the model for the length of a run (the PIECES
below). Each was proven equal to transformers' own code on a tiny random model of every family
in FAMILIES (tests/training/test_families.py, with each family's quirks switched on: short
sliding windows, soft-capping, logit scaling, multipliers). A family that is not in the table
runs every model piece stock; a piece the table or the config turns off runs stock too, and
packing stays correct there because transformers builds its own block-diagonal mask from the
restarting ``position_ids``.

Quirks, where they are handled:

- sliding windows (Mistral, Qwen2, Gemma 2/3, Phi-3, SmolLM3, Qwen3-MoE): packed attention
  masks keys a window or more behind the query (the window comes with each layer's call);
- attention soft-capping (Gemma 2's ``attn_logit_softcapping``): in packed attention (its
  matmul path, every bucket length); with attention dropout as well, that piece runs stock;
- final logit soft-capping (Gemma 2/3), logit scaling (Granite's ``logits_scaling``, Cohere's
  ``logit_scale``): applied by the fused loss (:class:`tunelab.training.loss.LogitHead`);
- attention/residual/embedding multipliers (Granite), embedding scaling (Gemma), q/k norms
  (Qwen3, OLMo 2, Gemma 3), biases (Qwen2): inside the body or the projections, which run
  unchanged; attention's scale comes with each call;
- RMSNorm: Llama's own code (mean of squares, rounded, then weight) and Gemma's (1 + weight,
  in fp32), each checked against transformers' source at run time; OLMo 2's and the
  LayerNorms (Cohere, StableLM, GPT-2, GPT-NeoX) run stock;
- rotary: only Llama's ``apply_rotary_pos_emb`` (also checked against the source at run
  time); Cohere's interleaved rotary runs stock.

Adding a family: one entry in FAMILIES, and one line in the test matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import FAST_PATH_PIECES

PIECES = FAST_PATH_PIECES
# replacements of PEFT's layers, not of the model's code: the same for every family
MODEL_INDEPENDENT = ("lora_forward", "dropout")


def _plain_logits(config: Any) -> tuple[float, float | None]:
    return 1.0, None


def _final_softcap(config: Any) -> tuple[float, float | None]:
    return 1.0, getattr(config, "final_logit_softcapping", None)


def _granite_logits(config: Any) -> tuple[float, float | None]:
    return 1.0 / config.logits_scaling, None  # transformers divides the logits by it


def _cohere_logits(config: Any) -> tuple[float, float | None]:
    return float(config.logit_scale), None


def _attention_softcap(config: Any) -> str | None:
    # packed attention soft-caps on its matmul path, which has no attention dropout
    cap = getattr(config, "attn_logit_softcapping", None)
    dropout = getattr(config, "attention_dropout", 0.0)
    if cap and dropout:
        return f"attention soft-capping with attention_dropout={dropout}"
    return None


def _no_attention_quirk(config: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Family:
    """The fast pieces proven equal for one ``model_type``.

    ``attention``/``rotary``/``norm``: whether packed attention, the rotary backward and the
    RMSNorm backward apply. ``logits(config)``: (scale, soft-cap) the family's LM head applies
    to its logits, ``cap * tanh(scale * logits / cap)`` (None: no cap); None for ``logits``
    means the loss runs through the model's own forward. ``attention_refused(config)``: why
    this checkpoint's config values need stock attention (None: they do not)."""

    attention: bool = True
    rotary: bool = True
    norm: bool = True
    logits: Callable[[Any], tuple[float, float | None]] | None = _plain_logits
    attention_refused: Callable[[Any], str | None] = field(default=_no_attention_quirk)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),  # sliding_window: in packed attention
    "qwen2": Family(),  # use_sliding_window / layer_types: in packed attention
    "qwen2_moe": Family(),
    "qwen3": Family(),
    "qwen3_moe": Family(),
    "smollm3": Family(),
    "phi3": Family(rotary=False),  # partial rotary: its own apply_rotary_pos_emb
    "olmo2": Family(rotary=False, norm=False),  # q/k norms before rotary; its own RMSNorm
    "granite": Family(logits=_granite_logits),
    # Gemma's (1 + weight) RMSNorm: its own backward in training.norm
    "gemma": Family(),
    "gemma2": Family(logits=_final_softcap, attention_refused=_attention_softcap),
    "gemma3_text": Family(logits=_final_softcap, attention_refused=_attention_softcap),
    "cohere": Family(rotary=False, norm=False, logits=_cohere_logits),
    "stablelm": Family(rotary=False, norm=False),  # partial rotary, LayerNorm
    "gpt_neox": Family(rotary=False, norm=False),  # partial rotary, LayerNorm
    # GPT-2's attention has its own upcast/reorder options and Conv1D projections
    "gpt2": Family(attention=False, rotary=False, norm=False),
}


@dataclass
class FastPathPlan:
    """Which pieces run tunelab's code for one model and run: ``fast`` maps each piece to
    whether it does, ``why`` to the reason a piece runs stock."""

    model_type: str
    fast: dict[str, bool]
    why: dict[str, str]

    def summary(self) -> str:
        """One line for the user: the fast pieces, then the stock ones with their reasons."""
        fast = [p for p in PIECES if self.fast[p]]
        stock = [f"{p} ({self.why[p]})" for p in PIECES if not self.fast[p]]
        line = f"Fast path ({self.model_type}): " + (", ".join(fast) or "none")
        return line + ("; stock: " + "; ".join(stock) if stock else "; nothing stock") + "."


def model_config(model: Any) -> Any:
    """The transformers config of a (PEFT-wrapped) model, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def family_of(model: Any) -> Family | None:
    """The table's entry for ``model``'s model_type, or None for a family not proven."""
    config = model_config(model)
    return FAMILIES.get(getattr(config, "model_type", None) or "")


def logit_transform(model: Any) -> tuple[float, float | None] | None:
    """(scale, soft-cap) of ``model``'s logits when its loss may be computed from the body's
    hidden states, else None (an unknown family: use the model's own forward)."""
    family = family_of(model)
    if family is None or family.logits is None:
        return None
    return family.logits(model_config(model))


def plan_fast_path(
    model: Any, enabled: bool = True, disabled: tuple[str, ...] = ()
) -> FastPathPlan:
    """Decide each piece for ``model``: fast where the family table proves it and the config
    (``fast_path``, ``fast_path_disable``) allows it, stock otherwise with the reason."""
    config = model_config(model)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    family = FAMILIES.get(model_type)
    fast: dict[str, bool] = {}
    why: dict[str, str] = {}
    for piece in PIECES:
        if not enabled:
            fast[piece], why[piece] = False, "fast_path: false"
        elif piece in disabled:
            fast[piece], why[piece] = False, "fast_path_disable"
        elif piece in MODEL_INDEPENDENT:
            fast[piece] = True
        elif family is None:
            fast[piece], why[piece] = False, "family not in tunelab's proven table"
        elif piece == "attention":
            refused = family.attention_refused(config) if family.attention else "not proven"
            fast[piece] = refused is None
            if refused:
                why[piece] = refused
        elif piece == "loss":
            fast[piece] = family.logits is not None
            if not fast[piece]:
                why[piece] = "not proven"
        else:
            fast[piece] = getattr(family, piece)
            if not fast[piece]:
                why[piece] = "the family's code differs from Llama's"
    return FastPathPlan(model_type, fast, why)
