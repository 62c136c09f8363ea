"""What a model is made of, read from its config alone: nothing is downloaded or allocated.

The model is built on the meta device (shapes, no storage), so even a 65B model costs a
fraction of a second, and trainable parameters are counted by attaching PEFT's own adapter to
that meta model, so they match what PEFT reports exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

from tunelab.config import DEFAULT_MODEL
from tunelab.errors import TunelabError, did_you_mean

ESTIMATE_METHODS = ("lora", "dora", "qlora", "full")
# the default model is SmolLM2-135M-Instruct, which has SmolLM2-135M's architecture
ALIASES = {DEFAULT_MODEL: "smollm2-135m"}


def shipped_configs() -> dict[str, Path]:
    """Short name -> shipped config.json (published values of well-known models)."""
    folder = resources.files("tunelab.planning") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


@dataclass
class Architecture:
    """The sizes that memory and compute depend on, plus the meta-device model."""

    name: str
    source: str  # where the config came from
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool  # SwiGLU-style MLP (gate and up projections) or a plain two-layer MLP
    tied_embeddings: bool
    config: Any = field(repr=False, default=None)

    @property
    def attention_width(self) -> int:
        """Width of the query (and of the expanded key/value) activations."""
        return self.num_heads * self.head_dim


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TunelabError(f"cannot read model config {path}: {exc}. Pass a config.json.") from None
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    model_type = values.pop("model_type", None)
    if not model_type:
        raise TunelabError(
            f"{path} has no 'model_type' key, so it is not a transformers config.json. Pass the "
            "config.json that sits beside the model's weights."
        )
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise TunelabError(
            f"{path}: model_type {model_type!r} is not known to transformers ({exc}). Estimates "
            "never run a model's own code (auto_map); pass the config.json of a supported "
            "architecture of the same shape with --config-json."
        ) from None


def load_model_config_offline(model: str, config_json: str | None = None) -> tuple[Any, str]:
    """(transformers config, where it came from) for a short name, folder, config.json or hub
    id; ``config_json`` overrides where the config is read from (for hub ids offline)."""
    if config_json:
        return _config_from_json(Path(config_json)), str(config_json)
    shipped = shipped_configs()
    key = ALIASES.get(model.lower(), model.lower())
    if key in shipped:
        return _config_from_json(shipped[key]), f"shipped config {key}"
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _config_from_json(path), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunelabError(
                f"model folder {path} has no config.json. Point at the folder that holds it, or "
                "pass --config-json PATH."
            )
        return _config_from_json(path / "config.json"), str(path / "config.json")
    if "/" in model and not path.exists():
        from transformers import AutoConfig

        try:  # only the local hub cache: estimates never download
            return AutoConfig.from_pretrained(
                model, local_files_only=True, trust_remote_code=False
            ), f"hub cache {model}"
        except (OSError, ValueError):
            raise TunelabError(
                f"the config of hub model '{model}' is not in the local hub cache, and estimates "
                "never download. Save its config.json and pass --config-json PATH, or use a "
                f"shipped name: {', '.join(sorted(shipped))}."
            ) from None
    raise TunelabError(
        f"model '{model}' is neither a shipped name, a model folder, a config.json nor a hub id."
        f"{did_you_mean(key, shipped)} Shipped names: {', '.join(sorted(shipped))}."
    )


def meta_model(config: Any) -> Any:
    """The causal LM of ``config`` on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            # estimates read shapes only: a folder's custom code (auto_map) is never run
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as exc:
        raise TunelabError(
            f"transformers cannot build a causal LM from this config ({exc}). Estimates "
            "cover decoder-only models."
        ) from None


def describe(model: str, config_json: str | None = None) -> Architecture:
    """The architecture of ``model`` (see ``load_model_config_offline``)."""
    config, source = load_model_config_offline(model, config_json)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    model_type = getattr(text, "model_type", "unknown")
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
    return Architecture(
        name=model,
        source=source,
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=inner or 4 * hidden,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        vocab_size=text.vocab_size,
        gated_mlp=getattr(text, "hidden_act", "") in ("silu", "swiglu")
        and getattr(text, "intermediate_size", None) is not None,
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        config=config,
    )


@dataclass
class ParameterCount:
    total: int  # including adapter weights, as PEFT's print_trainable_parameters counts
    trainable: int
    base: int  # the base model's own weights
    quantizable: int  # base weights in the decoder layers' linear layers (what QLoRA quantises)
    # (name, in_features) of each adapted linear layer of one decoder layer (inputs are saved)
    adapted_inputs: list[tuple[str, int]] = field(default_factory=list)


def count_parameters(
    arch: Architecture,
    method: str,
    lora_r: int = 8,
    target_modules: list[str] | None = None,
    lora_alpha: int = 16,
) -> ParameterCount:
    """Total and trainable parameters after attaching ``method`` to the meta-device model.

    For LoRA/DoRA/QLoRA the count comes from ``peft.get_peft_model`` itself.
    """
    if method not in ESTIMATE_METHODS:
        raise TunelabError(
            f"estimates cover the methods {', '.join(ESTIMATE_METHODS)}, not {method!r}."
            f"{did_you_mean(method, ESTIMATE_METHODS)}"
        )
    model = meta_model(arch.config)
    head = model.get_output_embeddings()
    base = sum(p.numel() for p in model.parameters())
    # bitsandbytes quantises every linear layer but the LM head
    quantizable = sum(
        m.weight.numel()
        for m in model.modules()
        if m is not head and type(m).__name__ in ("Linear", "Conv1D")
    )
    if method == "full":
        return ParameterCount(base, base, base, quantizable)
    import peft

    targets = list(target_modules or ["q_proj", "v_proj"])
    names = [n for n, _ in model.named_modules()]
    _check_targets(targets, dict(model.named_modules()), arch.name, method)
    targets_arg: Any = "all-linear" if targets == ["all-linear"] else targets
    if len(targets) == 1 and targets[0].startswith("re:"):  # one regex, as training takes it
        targets_arg = targets[0][3:]
    # GPT-2-style models store weights transposed (Conv1D); telling PEFT spares its warning
    transposed = any(type(m).__name__ == "Conv1D" for m in model.modules())
    lora = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=targets_arg,
        use_dora=method == "dora",
        bias="none",
        fan_in_fan_out=transposed,
    )
    wrapped = peft.get_peft_model(model, lora)
    trainable, total = wrapped.get_nb_trainable_parameters()
    first_layer = _first_layer_prefix(names)
    adapted = [
        (n.rsplit(".", 1)[-1], m.in_features)  # PEFT's own: Conv1D has no in_features
        for n, m in wrapped.named_modules()
        if hasattr(m, "lora_A") and first_layer in n and hasattr(m, "in_features")
    ]
    return ParameterCount(total, trainable, base, quantizable, adapted)


def _first_layer_prefix(names: list[str]) -> str:
    for name in names:
        parts = name.split(".")
        if parts[-1] == "0" and parts[-2] in ("layers", "h", "blocks"):
            return name + "."
    return ".0."


def _check_targets(targets: list[str], modules: dict[str, Any], model: str, method: str) -> None:
    """The training check (methods.check_target_modules): names the model has, and layers an
    adapter can wrap, not blocks (PEFT would fail on them with a traceback)."""
    from tunelab.config import FineTuningConfig, Method
    from tunelab.methods import check_target_modules

    # the caller checked method against ESTIMATE_METHODS, a subset of the config's Method
    config = FineTuningConfig(model_name=model, method=cast(Method, method), target_modules=targets)
    check_target_modules(config, modules, key="--target-modules")
