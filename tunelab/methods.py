"""Attach an adaptation method to a base model: the PEFT family, QLoRA, or full fine-tuning.

PEFT does the work; this module only maps tunelab's flat config onto PEFT's configs, checks
names against the model early, and adds what PEFT leaves to its caller (AdaLoRA's orthogonality
term of the loss, its rank allocation after each optimizer step, and the allocator's state in a
checkpoint).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from tunelab.config import PROMPT_METHODS as PROMPT_METHODS  # re-exported: the one list
from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError, did_you_mean

REGEX_PREFIX = "re:"


def linear_module_suffixes(names: Iterable[str]) -> list[str]:
    """The distinct last components of module names (what target_modules may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n in names if n})


def _targets(config: FineTuningConfig) -> str | list[str]:
    """target_modules as PEFT takes them: a list of names, 'all-linear', or one regex."""
    targets = config.target_modules
    if targets == ["all-linear"]:
        return "all-linear"
    if len(targets) == 1 and targets[0].startswith(REGEX_PREFIX):
        return targets[0][len(REGEX_PREFIX) :]
    return list(targets)


# the attention projections of families that do not call them q_proj / v_proj: the default
# target_modules become these (fused query-key-value layers; LoRA on all of q, k and v)
FAMILY_ATTENTION_TARGETS = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "phi3": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "dbrx": ["Wqkv"],
}
DEFAULT_TARGETS = ["q_proj", "v_proj"]


def family_target_modules(
    config: FineTuningConfig, model_type: str | None, module_names: Iterable[str]
) -> tuple[list[str], str] | None:
    """Where ``config.target_modules`` is the default q_proj/v_proj and the model has neither,
    the family's attention projections (FAMILY_ATTENTION_TARGETS) and a note saying so; None
    when the configured ones stay (check_target_modules then reports what is missing)."""
    if config.target_modules != DEFAULT_TARGETS or config.method in PROMPT_METHODS:
        return None
    suffixes = set(linear_module_suffixes(module_names))
    family = FAMILY_ATTENTION_TARGETS.get(model_type or "")
    if set(DEFAULT_TARGETS) & suffixes or family is None or not set(family) <= suffixes:
        return None
    return list(family), (
        f"target_modules: {model_type} has no q_proj/v_proj; using its attention projection "
        f"{', '.join(family)} (set target_modules in the config to choose others)."
    )


def adaptable_types(method: str) -> tuple[type, ...]:
    """The layer types PEFT can wrap with ``method``'s adapter (its dispatchers' lists): LoRA
    and DoRA take linear, embedding and convolution layers, IA3 linear and convolution layers,
    AdaLoRA linear ones. A block (an attention or MLP module) holds such layers but is not one.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer

    linear: tuple[type, ...] = (nn.Linear, Conv1D)
    if method == "adalora":
        return linear
    if method == "ia3":
        return (*linear, nn.Conv2d, nn.Conv3d)
    return (*linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, target: str) -> bool:
    """Whether PEFT's name matching puts ``target`` on module ``name`` (the name or its end)."""
    return name == target or name.endswith("." + target)


def _block_error(
    config: FineTuningConfig, target: str, modules: dict[str, Any], blocked: str, key: str
) -> str:
    """Why ``target`` cannot take an adapter, naming the layers inside the block it names."""
    kinds = adaptable_types(config.method)
    inner = linear_module_suffixes(
        n[len(blocked) + 1 :]
        for n, m in modules.items()
        if n.startswith(blocked + ".") and isinstance(m, kinds)
    )
    block = type(modules[blocked]).__name__
    short = blocked.rsplit(".", 1)[-1]
    start = f"{key} holds {target!r}: "
    if not inner:
        takes = ", ".join(k.__name__ for k in kinds)
        return (
            f"{start}{short} is a {block} layer, which a {config.method} adapter cannot wrap "
            f"(it takes {takes} layers). Remove it, or use ['all-linear']."
        )
    # the usual pair where the block holds it, else its first two layers
    example = ["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= set(inner) else inner[:2]
    what = f"a block ({block})"
    if "MLP" in block:
        what = f"a feed-forward block ({block})"
    elif "Attention" in block:
        what = f"an attention block ({block})"
    return (
        f"{start}{short} is {what}, not a layer an adapter can wrap; its layers are "
        f"{', '.join(inner)}. Name those (e.g. target_modules: [{', '.join(example)}]) or use "
        "['all-linear']."
    )


def check_target_modules(
    config: FineTuningConfig, modules: dict[str, Any], key: str = "config key 'target_modules'"
) -> None:
    """Fail early when a target module is missing from the model or is not a layer the method's
    adapter can wrap (``modules``: name -> module, e.g. from ``models.model_modules`` on the
    meta device); errors name ``key`` and list the names that can be used."""
    if config.method in PROMPT_METHODS or config.method == "full":
        return
    targets = _targets(config)
    if targets == "all-linear":
        return
    kinds = adaptable_types(config.method)
    adaptable = {n for n, m in modules.items() if n and isinstance(m, kinds)}
    suffixes = set(linear_module_suffixes(adaptable))
    candidates = sorted(s for s in suffixes if s.endswith("proj") or "attn" in s or "fc" in s)
    listing = ", ".join(candidates or sorted(suffixes)[:20])
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise TunelabError(
                f"{key} holds the regex {targets!r}, which does not "
                f"compile ({exc}). Fix the pattern after 're:'."
            ) from None
        matched = [name for name in modules if name and pattern.fullmatch(name)]
        if not matched:
            raise TunelabError(
                f"{key} regex {targets!r} matches no module of "
                f"'{config.model_name}' (it must match whole names such as "
                f"'model.layers.0.self_attn.q_proj'). Module names end in: {listing}."
            )
        blocked = next((n for n in matched if n not in adaptable), None)
        if blocked is not None:
            raise TunelabError(_block_error(config, REGEX_PREFIX + targets, modules, blocked, key))
        return
    if any(t.startswith(REGEX_PREFIX) for t in targets):
        raise TunelabError(
            f"{key} may hold one 're:' regex alone, not mixed with names. "
            "Use either [q_proj, v_proj] or ['re:.*\\.(q|v)_proj']."
        )
    missing = [t for t in targets if not any(_matches(n, t) for n in modules)]
    if missing:
        raise TunelabError(
            f"{key} names {', '.join(map(repr, missing))}, which the model "
            f"'{config.model_name}' does not have.{did_you_mean(missing[0], suffixes)} Its "
            f"adaptable layers are named: {listing}; or use ['all-linear']."
        )
    for target in targets:
        blocked = next((n for n in modules if _matches(n, target) and n not in adaptable), None)
        if blocked is not None:
            raise TunelabError(_block_error(config, target, modules, blocked, key))
    for key in ("rank_pattern", "alpha_pattern"):
        for name in getattr(config, key):
            if not any(name in module for module in adaptable):
                raise TunelabError(
                    f"config key '{key}' names {name!r}, which matches no adaptable layer of the "
                    f"model.{did_you_mean(name, suffixes)} Layer names end in: {listing}."
                )


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable, total = 0, 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def format_trainable(model: Any) -> str:
    """The seed's line: 'Trainable parameters: 460,800 (0.34%)'."""
    trainable, total = count_parameters(model)
    return f"Trainable parameters: {trainable:,} ({trainable / total:.2%})"


def _modules_to_save(model: Any, config: FineTuningConfig) -> list[str] | None:
    names = []
    if config.train_embeddings:
        embeddings = model.get_input_embeddings()
        names += [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is embeddings]
    if config.train_lm_head:
        head = model.get_output_embeddings()
        names += [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head]
    return sorted(set(names)) or None


def peft_config_for(
    model: Any, config: FineTuningConfig, tokenizer_path: str | None = None, total_steps: int = 0
) -> Any:
    """The PEFT config of ``config.method`` (None for full fine-tuning)."""
    import peft

    task = peft.TaskType.CAUSAL_LM
    method = config.method
    if method == "full":
        return None
    modules_to_save = _modules_to_save(model, config)
    if method in ("lora", "dora", "qlora"):
        return peft.LoraConfig(
            task_type=task,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_targets(config),
            bias="none",
            use_rslora=config.use_rslora,
            use_dora=method == "dora",
            init_lora_weights=_lora_init(config),
            **_lora_init_extras(config),
            rank_pattern=dict(config.rank_pattern),
            alpha_pattern=dict(config.alpha_pattern),
            modules_to_save=modules_to_save,
        )
    if method == "adalora":
        if total_steps < 3:  # PEFT needs a step between the warm-up and the final pruning
            raise TunelabError(
                f"method adalora needs at least 3 training steps to schedule its rank pruning "
                f"(this run has {total_steps}); train with more data or set max_steps of at "
                "least 3."
            )
        # prune between 10% and 70% of training, re-allocating ranks every 1% of it
        return peft.AdaLoraConfig(
            task_type=task,
            init_r=config.adalora_init_r,
            target_r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_targets(config),
            total_step=total_steps,
            tinit=max(1, total_steps // 10),
            tfinal=max(1, total_steps * 3 // 10),
            deltaT=max(1, total_steps // 100),
            modules_to_save=modules_to_save,
        )
    if method == "ia3":
        targets = _targets(config)
        feedforward = (
            [t for t in targets if t in ("down_proj", "fc2", "c_proj", "dense_4h_to_h")]
            if isinstance(targets, list)
            else None
        )
        return peft.IA3Config(
            task_type=task,
            target_modules=targets,
            feedforward_modules=feedforward or [],
            modules_to_save=modules_to_save,
        )
    if method == "prompt_tuning":
        init: dict[str, Any] = {}
        if config.prompt_init_text:
            init = {
                "prompt_tuning_init": peft.PromptTuningInit.TEXT,
                "prompt_tuning_init_text": config.prompt_init_text,
                "tokenizer_name_or_path": tokenizer_path,
            }
        return peft.PromptTuningConfig(
            task_type=task, num_virtual_tokens=config.num_virtual_tokens, **init
        )
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=config.num_virtual_tokens)
    raise TunelabError(f"unknown method {method!r}")  # validate() makes this unreachable


def quantization_config(config: FineTuningConfig, compute_dtype: Any) -> Any:
    """The bitsandbytes config of a QLoRA base: NF4 with double quantisation, or 8-bit."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError(
            "method qlora needs bitsandbytes, which is not installed. Install it with: "
            "pip install 'tunelab[qlora]'  (or pip install bitsandbytes)"
        ) from None
    from transformers import BitsAndBytesConfig

    if config.quantization_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_4bit_format(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit CPU weights into its inference layout.

    It does so on the first no-grad forward in eval mode; no gradient flows through a repacked
    layer afterwards (training evaluates mid-run), and the repacked layer computes in bf16, so
    a reloaded run would not reproduce the trained model's outputs.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# LoftQ starts as the default and is set afterwards by lora_init.initialize_loftq: PEFT's own
# LoftQ quantizes on CUDA only
_LORA_INITS: dict[str, Literal[True, "gaussian", "pissa", "olora", "eva"]] = {
    "default": True,  # PEFT's default, B = 0
    "loftq": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
    "eva": "eva",
}


def _lora_init(config: FineTuningConfig) -> Literal[True, "gaussian", "pissa", "olora", "eva"]:
    """PEFT's init_lora_weights for the config (config.INIT_LORA_WEIGHTS names the choices)."""
    return _LORA_INITS[config.init_lora_weights]


def _lora_init_extras(config: FineTuningConfig) -> dict[str, Any]:
    """The sub-config PEFT needs for the initialisation (EVA's rank redistribution)."""
    if config.init_lora_weights != "eva":
        return {}
    import peft

    return {"eva_config": peft.EvaConfig(rho=config.eva_rho)}


def apply_method(
    model: Any, config: FineTuningConfig, tokenizer_path: str | None = None, total_steps: int = 0
) -> Any:
    """Wrap ``model`` for training with ``config.method``.

    PEFT methods keep the base frozen in its dtype and the adapter weights in fp32
    (``autocast_adapter_dtype``), so a bf16 base trains stably. ``full`` trains every weight.
    """
    if config.method == "full":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        # casts norms to fp32 and lets gradients flow into the quantised layers' inputs
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_format(model)
    peft_config = peft_config_for(model, config, tokenizer_path, total_steps)
    with warnings.catch_warnings():
        # EVA's A matrices are set from data right after (lora_init): no memory to save here
        warnings.filterwarnings("ignore", "lora with eva initialization used with low_cpu")
        return get_peft_model(model, peft_config, autocast_adapter_dtype=True)


def _adalora(model: Any) -> Any:
    """The PEFT AdaLoraModel inside ``model``, or None for any other method."""
    from peft.tuners.adalora import AdaLoraModel

    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, AdaLoraModel) else None


def method_loss_term(model: Any) -> Any:
    """The term a method adds to the training loss (a 0-dim tensor), or None for none.

    AdaLoRA: ``orth_reg_weight`` x the mean over its lora_A and lora_B matrices P of
    ||P P^T - I||_F (lora_A, r x in) or ||P^T P - I||_F (lora_B, out x r), which keeps them
    near-orthogonal as the SVD form assumes. It is what PEFT's AdaLoraModel.forward adds to
    ``outputs.loss``; tunelab computes the loss itself, so the step adds it, once a step.
    """
    import torch

    tuner = _adalora(model)
    if tuner is None:
        return None
    adapter = tuner.trainable_adapter_name
    penalty, count = torch.zeros(()), 0
    for name, p in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            penalty = penalty.to(cov.device) + torch.norm(cov - eye, p="fro")
            count += 1
    return tuner.peft_config[adapter].orth_reg_weight * penalty / max(count, 1)


def after_optimizer_step(model: Any, step: int) -> None:
    """Work PEFT leaves to the loop after an optimizer step, before the gradients are zeroed.

    AdaLoRA: score the singular values by their gradients and prune ranks by the schedule of
    ``step`` (the optimizer step just taken, from 1; the run's step, so it continues on resume).
    """
    tuner = _adalora(model)
    if tuner is not None:
        tuner.update_and_allocate(step)


@contextlib.contextmanager
def whole_ranks(model: Any) -> Iterator[None]:
    """Save AdaLoRA's matrices whole: PEFT cuts the saved ones to the rank pattern decided so
    far, which a checkpoint cannot resume from exactly (pruned rows still train, and count in
    the orthogonality term); the pattern goes into the checkpoint's method state instead."""
    tuner = _adalora(model)
    if tuner is None:
        yield
        return
    peft_config = tuner.peft_config[tuner.trainable_adapter_name]
    pattern, peft_config.rank_pattern = peft_config.rank_pattern, None
    try:
        yield
    finally:
        peft_config.rank_pattern = pattern


def method_state(model: Any) -> dict[str, Any] | None:
    """What a method keeps outside the weights, for a checkpoint (tensors and plain data).

    AdaLoRA: the rank allocator's importance averages and the rank pattern it decided. Sharded
    tensors are gathered whole, so every process must call this.
    """
    tuner = _adalora(model)
    if tuner is None:
        return None
    allocator = tuner.rankallocator

    def whole(scores: dict[str, Any]) -> dict[str, Any]:
        return {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in scores.items()
        }

    config = tuner.peft_config[tuner.trainable_adapter_name]
    return {
        "ipt": whole(allocator.ipt),
        "exp_avg_ipt": whole(allocator.exp_avg_ipt),
        "exp_avg_unc": whole(allocator.exp_avg_unc),
        "rank_pattern": config.rank_pattern,
    }


def load_method_state(
    model: Any, saved: dict[str, Any] | None, checkpoint: Path, step: int
) -> None:
    """Put back what ``method_state`` saved in ``checkpoint`` (of optimizer step ``step``).

    A checkpoint written before tunelab saved it (``saved`` None) resumes AdaLoRA with fresh
    importance averages; one past the final allocation without a pattern is refused with a
    TunelabError (its pruning would be lost).
    """
    tuner = _adalora(model)
    if tuner is None:
        return
    peft_config = tuner.peft_config[tuner.trainable_adapter_name]
    saved = saved or {}
    allocator = tuner.rankallocator
    placed = {name: p for name, p in tuner.model.named_parameters()}
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        scores = {}
        for name, value in saved.get(key, {}).items():
            like = placed.get(name)
            if like is not None and hasattr(like, "device_mesh"):  # sharded: this process's part
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(like.device), like.device_mesh, like.placements)
            scores[name] = value.to(like.device) if like is not None else value
        setattr(allocator, key, scores)
    peft_config.rank_pattern = saved.get("rank_pattern")
    final = peft_config.total_step - peft_config.tfinal
    if step >= final and not peft_config.rank_pattern:
        raise TunelabError(
            f"checkpoint {checkpoint} is past AdaLoRA's final rank allocation (step {final}) "
            "but holds no rank pattern in its training_state.pt, so the ranks it pruned "
            f"cannot be kept. Delete {checkpoint} to resume from an earlier "
            "checkpoint, or start the run again with --overwrite."
        )
