"""Give modules another forward for the length of a run, and their own back after; and
compute what the replaced forwards of every layer share once per forward."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def replaced_forwards(
    model: Any, make_forward: Callable[[nn.Module], Callable[..., Any] | None]
) -> Iterator[int]:
    """Set ``module.forward = make_forward(module)`` on every module of ``model`` it returns a
    forward for (an instance attribute, so the class and other instances are untouched); yields
    how many were replaced, and deletes the attributes after. Modules that already carry an
    instance forward (someone else's patch) are left alone."""
    replaced: list[nn.Module] = []
    for module in model.modules():
        if "forward" in module.__dict__:
            continue
        forward = make_forward(module)
        if forward is not None:
            module.forward = forward
            replaced.append(module)
    try:
        yield len(replaced)
    finally:
        for module in replaced:
            del module.forward


def once_per_forward(
    cache: dict[str, Any], tensors: tuple[torch.Tensor, ...], build: Callable[[], Any], *extra: Any
) -> Any:
    """``build()`` for these ``tensors`` (position ids, rotary angles: every layer of a forward
    gets the same objects), reused until others come. The cache holds the tensors themselves,
    so no later tensor can take one's id or memory and be mistaken for it (a key of id and
    data pointer alone handed a previous batch's layout to 17 of 200 fresh tensors in a loop);
    an in-place change (a new version) counts as new."""
    key = (tuple(t._version for t in tensors), *extra)
    held = cache.get("tensors", ())
    same = len(held) == len(tensors) and all(a is b for a, b in zip(held, tensors, strict=True))
    if not same or cache.get("key") != key:
        cache.update(tensors=tensors, key=key, value=build())
    return cache["value"]
