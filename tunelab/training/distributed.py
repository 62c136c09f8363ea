"""Several processes (torchrun / accelerate launch): data parallel, only rank 0 writes.

``batch_size`` is per process, as in the seed (``per_device_train_batch_size``), transformers,
TRL, Axolotl and LLaMA-Factory: an optimizer step takes batch_size x gradient_accumulation_steps
x processes rows, each process every world_size-th of its micro-batches, and the summed
gradients and loss-token counts are all-reduced before the step. Because each micro-batch's
loss is divided by the loss tokens of the whole step (across processes), the update is exactly
the one a single process makes on the same global batch (gradient_accumulation_steps x
processes micro-batches); that is the gradient DistributedDataParallel would give, without its
wrapper around the PEFT model.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard

import torch
import torch.distributed as dist

from tunelab.errors import TunelabError
from tunelab.messages import is_main_process, launched_processes

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


@dataclass
class World:
    rank: int = 0
    size: int = 1
    # where this process's collectives take their tensors: NCCL reduces only tensors on the
    # process's own GPU, gloo CPU tensors
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def note_once(text: str, level: int = logging.INFO) -> None:
    """Log ``text`` on the ``tunelab.train`` logger from the main process only: under torchrun
    every process loads the same data and model, and each start line would otherwise appear
    once per process. Notes (INFO) show on stdout, warnings on stderr (tunelab.messages)."""
    if is_main_process():
        logging.getLogger("tunelab.train").log(level, text)


def local_device(device: str) -> str:
    """This process's device. Under torchrun / accelerate launch with several processes,
    ``"cuda"`` is the GPU numbered LOCAL_RANK (``"cuda:1"`` on local rank 1), made the current
    CUDA device first, as torch.distributed's documentation does before init_process_group:
    NCCL, FSDP's device mesh and tensors made on ``"cuda"`` then use it, not GPU 0. Any other
    device (``"cpu"``, an explicit ``"cuda:N"``) is returned as it is.

    Raises TunelabError when LOCAL_RANK names a GPU this process cannot see.
    """
    if str(device) != "cuda" or launched_processes() <= 1 or "LOCAL_RANK" not in os.environ:
        return device
    rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if rank >= count:
        raise TunelabError(
            f"this process is LOCAL_RANK {rank} of a launch over several processes, but it sees "
            f"{count} GPU(s): each process needs a GPU of its own. Launch at most {count} "
            f"processes per machine (torchrun --nproc_per_node {count}), or check "
            "CUDA_VISIBLE_DEVICES."
        )
    torch.cuda.set_device(rank)
    return f"cuda:{rank}"


def init_world(device: str) -> World:
    """Join the process group that torchrun/accelerate describe in the environment
    (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR...); a single process when they are absent.

    On CUDA each process binds to its own GPU (local_device) and joins over NCCL; on the CPU
    over gloo. A group someone else initialized (accelerate's PartialState) is used as it is.
    """
    if launched_processes() <= 1:
        return World()
    device = local_device(device)
    if not dist.is_initialized():
        if str(device).startswith("cuda"):
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
        atexit.register(leave_world)
    return current_world()


def current_world() -> World:
    """The process group joined by init_world, or a single process when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _collective_device())
    return World()


def _collective_device() -> torch.device:
    """NCCL's tensors live on this process's GPU (the current one, set by local_device)."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def leave_world() -> None:
    """Destroy the process group while the interpreter is still whole (run at exit).

    Left to interpreter shutdown, Gloo's worker threads can outlive the objects they hold and
    the process aborts ("terminate called without an active exception", SIGABRT) after a
    finished run: it failed CI once, in the two-process test, on the rank that exited first
    (pytorch/pytorch#190489). Local: no collective, so a rank that leaves early cannot hang.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # objects in reference cycles that still hold the group go now, not later
    _held.clear()  # the group's worker threads are joined: nothing else holds these now


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker at once: process group destroyed, output flushed, and no
    interpreter shutdown. FSDP's device meshes (held by the model's sharded tensors) keep the
    Gloo group alive past destroy_process_group, and its threads then aborted a finished rank
    in shutdown now and then (1 run in 8 of the FSDP test); nothing is left to run by then:
    the run folder is written and fsynced."""
    leave_world()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def global_batch_note(batch_size: int, accumulation: int, world: World) -> str | None:
    """The line to print once at the start of a run over several processes: batch_size is per
    process, so the global batch grows with them (None for one process)."""
    if not world.active:
        return None
    rows = batch_size * accumulation * world.size
    return (
        f"Global batch: {rows} rows per optimizer step = batch_size {batch_size} per process x "
        f"gradient_accumulation_steps {accumulation} x {world.size} processes."
    )


def all_reduce_sum(value: float | int, world: World) -> float:
    """``value`` summed over the processes (in float64, on the world's device)."""
    if not world.active:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=world.device)
    all_reduce(tensor)
    return float(tensor)


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every process's ``value`` (JSON: dicts, lists, strings, numbers, exact for floats, nan
    and inf included), in rank order; ``[value]`` for one process."""
    if not world.active:
        return [value]
    # all_gather_object's own tensors die in torch's frame, out of hold's reach: its exchange
    # (sizes first, then the bytes padded to the longest) on held tensors, in JSON, not pickle,
    # which would run code from another process's bytes
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=world.device)
    sizes = [torch.zeros_like(size) for _ in range(world.size)]
    all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=world.device)
    padded[: data.numel()] = data.to(world.device)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    all_gather(parts, padded)
    pairs = zip(parts, sizes, strict=True)
    return [json.loads(part[: int(n)].cpu().numpy().tobytes()) for part, n in pairs]


def all_reduce_gradients(params: list[torch.Tensor], world: World) -> None:
    """Sum each trainable parameter's gradient over the processes (one flat fp32 buffer on the
    world's device)."""
    if not world.active:
        return
    # sharded (FSDP) parameters had their gradients reduce-scattered in the backward
    params = [p for p in params if not is_dtensor(p)]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(world.device, torch.float32) for g in grads])
    all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype)
        offset += n


# Tensors handed to collectives, kept alive by Python until the backend's worker threads let go
# of them. On torch < 2.8, ProcessGroupGloo's destructor joins its worker threads while holding
# the GIL (fixed by pytorch/pytorch#154976); a worker that held the last reference to a finished
# collective's tensor, whose Python object had already died, needed the GIL to free it, and both
# waited forever: a two-process run hung at exit in 7 runs of 20 on torch 2.5. Held here, the
# worker's reference is never the last one, so dropping it needs no GIL; leave_world lets go of
# them once the group is destroyed. A tensor only Python holds (use count 1) is let go at the
# next collective, so this keeps at most the last step's buffers. torch 2.8 releases the GIL in
# the destructor, and nothing is held there (a held gradient buffer would outlive its step).
_held: list[torch.Tensor] = []
_HOLD = torch.__version__ < "2.8"


def hold(*tensors: torch.Tensor) -> None:
    """Keep ``tensors`` (just handed to a collective) alive until the group is destroyed or the
    backend no longer holds them, on torch < 2.8; see _held."""
    if not _HOLD:
        return
    _held[:] = [t for t in _held if t._use_count() > 1]  # type: ignore[attr-defined]
    _held.extend(tensors)


def all_reduce(tensor: torch.Tensor) -> None:
    """dist.all_reduce (sum, in place), its tensor held (see _held)."""
    hold(tensor)
    dist.all_reduce(tensor)


def all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
    """dist.all_gather, its tensors held (see _held)."""
    hold(tensor, *outputs)
    dist.all_gather(outputs, tensor)


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def shard(items: list[Any], world: World) -> list[Any]:
    return items[world.rank :: world.size] if world.active else items


def is_dtensor(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (a parameter FSDP sharded over the processes)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
