"""Several processes (torchrun / accelerate launch): data parallel, only rank 0 writes.

Each process takes every world_size-th micro-batch of an optimizer step, and the summed
gradients and loss-token counts are all-reduced before the step. Because each micro-batch's
loss is divided by the loss tokens of the whole step (across processes), the update is exactly
the one a single process makes on the same global batch, whatever the split; that is the
gradient DistributedDataParallel would give, without its wrapper around the PEFT model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
    return World(dist.get_rank(), dist.get_world_size())


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
