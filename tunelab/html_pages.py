"""Rendering tunelab's HTML reports (run comparison, evaluation report, data report) from the
Jinja2 templates in ``tunelab/templates``, with autoescape on: a run name, a question or an
answer holding ``<script>`` is shown as text, never run."""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tunelab", "templates"),
        autoescape=True,  # every template here is HTML or SVG
        undefined=jinja2.StrictUndefined,  # a misspelt name fails loudly in the tests
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    """The template ``tunelab/templates/<template>`` filled with ``context`` (autoescaped;
    pass markup that is already safe as ``markupsafe.Markup``)."""
    return _environment().get_template(template).render(**context)
