"""Give modules another forward for the length of a run, and their own back after."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
