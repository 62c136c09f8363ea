"""YAML read with YAML 1.2's numbers: ``1e-4`` is a float, as the user meant.

PyYAML follows YAML 1.1, whose float pattern needs a dot, so ``learning_rate: 1e-4`` came back
as the string ``'1e-4'`` while ``1.0e-4`` was a number. Every place tunelab reads YAML (run
configs, saved run configs, sweep files, ``--set`` values) goes through ``load_yaml`` so a
number is a number wherever it is written.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2 core schema floats (and PyYAML's own 1.1 forms: 1_000.5, .inf, .nan, sexagesimal
# are kept so nothing that read as a number before reads differently now)
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class NumberLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float pattern (``1e-4``, ``3E5``)."""


# the resolvers are kept per first character: replace the float one for each of them
NumberLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
NumberLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text (safe: no objects are built) with ``1e-4`` read as the float 0.0001.

    Raises ``yaml.YAMLError`` for text that is not YAML, as ``yaml.safe_load`` does.
    """
    return yaml.load(text, Loader=NumberLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """`` line N`` (1-based) where PyYAML found the problem in ``exc``, or ``""`` when it says
    no place: the piece of a 'FILE line N: not valid YAML' message."""
    mark = getattr(exc, "problem_mark", None)
    return f" line {mark.line + 1}" if mark else ""
