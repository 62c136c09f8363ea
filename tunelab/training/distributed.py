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
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device: str) -> World:
    """Join the process group that torchrun/accelerate describe in the environment
    (WORLD_SIZE, RANK, MASTER_ADDR...); a single process when they are absent."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        atexit.register(leave_world)
    return World(dist.get_rank(), dist.get_world_size())


def current_world() -> World:
    """The process group joined by init_world, or a single process when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


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


def local_device(device: str) -> str:
    """Each process on its own GPU (LOCAL_RANK), as torchrun arranges."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def all_reduce_sum(value: float | int, world: World, device: str = "cpu") -> float:
    if not world.active:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor)


def all_reduce_gradients(params: list[torch.Tensor], world: World) -> None:
    """Sum each trainable parameter's gradient over the processes (one flat buffer)."""
    if not world.active:
        return
    from tunelab.training.sharding import is_dtensor

    # sharded (FSDP) parameters had their gradients reduce-scattered in the backward
    params = [p for p in params if not is_dtensor(p)]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def shard(items: list[Any], world: World) -> list[Any]:
    return items[world.rank :: world.size] if world.active else items
