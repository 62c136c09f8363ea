"""FSDP for several processes (`sharding: fsdp`): each decoder layer's weights split across them.

With `sharding: none` every process holds the whole model (data parallel, distributed.py).
With `fsdp`, torch's FSDP2 (`fully_shard`) shards every decoder layer (the model's
`_no_split_modules`, as accelerate's auto-wrap does): a layer's weights are gathered for its
forward and backward and dropped after, and its trainable parameters, their gradients and
AdamW's moments stay sharded, so each process holds about 1/N of the layers. The embeddings,
the final norm and the LM head stay whole on every process (the fused cross-entropy reads the
head's weight outside any layer's forward).

What stays the same as one process: the update (gradients are summed, not averaged, because
each micro-batch's loss is already divided by the whole step's loss tokens), the checkpoints
(a full adapter and a full optimizer state, gathered to rank 0, so a sharded run resumes sharded
or not) and the saved adapter. Every process must run the same forwards (a layer's forward is a
collective), so the accumulation must split evenly and evaluation pads the shorter shares.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.training.distributed import World, is_dtensor

if TYPE_CHECKING:
    pass


def wants_fsdp(sharding: str) -> bool:
    """`sharding: fsdp`, or `accelerate launch` with its FSDP plugin (ACCELERATE_USE_FSDP)."""
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
    return sharding == "fsdp" or from_accelerate


def _fsdp() -> Any:
    """torch's FSDP2 module: torch.distributed.fsdp from torch 2.6 on; under
    torch.distributed._composable.fsdp in 2.5 (None when neither is there)."""
    try:
        import torch.distributed.fsdp as fsdp

        if hasattr(fsdp, "fully_shard"):
            return fsdp
        import torch.distributed._composable.fsdp as composable

        return composable
    except ImportError:
        return None


def fsdp_unavailable() -> str | None:
    """Why this torch cannot shard as tunelab does (None when it can). The update stays the one
    a single process makes only with summed, undivided gradient reductions (FSDP2's
    set_gradient_divide_factor and set_force_sum_reduction_for_comms, both from torch 2.8)."""
    fsdp = _fsdp()
    module = getattr(fsdp, "FSDPModule", None)
    if module is None or not hasattr(module, "set_force_sum_reduction_for_comms"):
        return (
            f"sharding: fsdp needs torch 2.8 or later (FSDP2's sum-only gradient reductions, "
            f"which keep the update equal to one process's); this is torch {torch.__version__}. "
            "Upgrade torch, or use sharding: none (every process holds the whole model)."
        )
    return None


def check_shardable(method: str, optimizer: str = "adamw") -> None:
    """Refuse at start what sharding: fsdp cannot do: QLoRA, AdaLoRA, bitsandbytes' 8-bit
    AdamW, or a torch before 2.8."""
    reason = fsdp_unavailable()
    if reason:
        raise TunelabError(reason)
    if optimizer == "adamw_8bit":
        # its fused update is a custom operator with no DTensor rule: the first step failed
        # deep inside torch ("does not have a sharding strategy registered"); stepping each
        # shard alone would quantize other blocks than one process does
        raise TunelabError(
            "sharding: fsdp cannot use optimizer: adamw_8bit (bitsandbytes' 8-bit update has "
            "no rule for FSDP's sharded parameters). Use optimizer: adamw (FSDP already splits "
            "its moments over the processes) or sharding: none."
        )
    if method == "qlora":
        raise TunelabError(
            "sharding: fsdp cannot split QLoRA's 4-bit base weights (bitsandbytes' packed "
            "tensors are not shardable here). Use sharding: none (every process holds the "
            "4-bit model, which is what QLoRA is for) or method: lora."
        )
    if method == "adalora":
        # PEFT's rank allocator scores each whole lora_A/lora_E/lora_B and its gradient and
        # masks them in place every step; FSDP holds only a shard of each outside forward
        raise TunelabError(
            "sharding: fsdp cannot run method: adalora (AdaLoRA's rank allocation reads and "
            "prunes each whole adapter matrix every step, which FSDP splits over the "
            "processes). Use sharding: none (each process holds the adapter; the processes "
            "prune the same ranks) or method: lora."
        )


def layer_classes(model: nn.Module) -> set[str]:
    """The decoder-layer class names the model declares (transformers' _no_split_modules)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard_model(model: nn.Module, device: str = "cpu") -> int:
    """fully_shard every decoder layer of ``model`` over the default process group, the shards
    on ``device``, and move the rest of the model there; returns how many layers. Gradients are
    summed over the processes (sum-only collectives: gloo has no PREMUL_SUM).

    On GPUs the model comes loaded in CPU memory (api.prepare_model), so a GPU never holds more
    than its shards, the whole embeddings and head, and the layers being gathered.
    """
    reason = fsdp_unavailable()
    if reason:
        raise TunelabError(reason)
    fsdp = _fsdp()

    if str(device).startswith("cuda"):
        torch.cuda.set_device(device)  # FSDP's default mesh puts the shards on this GPU
    if is_sharded(model):  # trained before in this process (FineTuner.train called again)
        return sum(1 for m in model.modules() if isinstance(m, fsdp.FSDPModule))
    classes = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise TunelabError(
            f"sharding: fsdp found no decoder layers to shard in {type(model).__name__} (it "
            "declares no _no_split_modules). Use sharding: none."
        )
    for layer in layers:
        # explicitly: each layer is its own FSDP root, and a root left to the default keeps its
        # gathered weights after the forward (the whole model held from forward to backward,
        # and after an evaluation); those then also take the requires_grad flags PEFT's
        # disable_adapter() sets and resets for the reference pass, not the shards, so the
        # adapter stopped training after the first step
        sharded = fsdp.fully_shard(layer, reshard_after_forward=True)
        sharded.set_gradient_divide_factor(1.0)
        sharded.set_force_sum_reduction_for_comms(True)
    model.to(device)  # the sharded layers are there already; embeddings, head, buffers follow
    return len(layers)


def is_sharded(model: nn.Module) -> bool:
    module = getattr(_fsdp(), "FSDPModule", None)
    return module is not None and any(isinstance(m, module) for m in model.modules())


def forwards_to_add(total: int, mine: int, model: nn.Module, world: World) -> int:
    """How many forwards a process running ``mine`` of ``total`` batches adds, on a batch whose
    result it drops, so that every process runs as many: a sharded layer's forward (and
    backward) gathers its weights from all the processes, a collective each must join in the
    same order. 0 when ``model`` is not sharded (each process then runs its own share)."""
    if not world.active or not is_sharded(model):
        return 0
    return -(-total // world.size) - mine


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients, sharded or whole: each process's shards are
    disjoint, so their squared sums add up in one all-reduce; whole gradients (already
    all-reduced, the same everywhere) count once."""
    from tunelab.training.distributed import all_reduce, current_world

    # on this process's collective device (its GPU under NCCL), even when it holds no gradient
    device = current_world().device
    local = torch.zeros((), dtype=torch.float64, device=device)
    whole = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is None:
            continue
        if is_dtensor(p.grad):
            local += p.grad.to_local().double().pow(2).sum().to(device)
        else:
            whole += p.grad.double().pow(2).sum().to(device)
    all_reduce(local)
    return (local + whole).sqrt()


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Like clip_grad_norm_ (same 1e-6 guard), for a mix of sharded and whole gradients."""
    norm = float(grad_norm(params))
    if max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
    return norm


def full_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict PEFT / transformers save from, with every trainable sharded tensor
    gathered whole (a collective: every process calls it, in the same order) and frozen sharded
    base weights left out (an adapter does not store them). None when nothing is sharded."""
    if not is_sharded(model):
        return None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = {}
    for name, value in model.state_dict().items():
        if is_dtensor(value):
            if name not in trainable:
                continue
            value = value.full_tensor()
        state[name] = value.detach().cpu()
    return state


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter name (a collective; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Put a name-keyed whole optimizer state back, sharding it where the parameters are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)
