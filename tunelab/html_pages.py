"""Rendering tunelab's HTML reports (run comparison, evaluation report, data report) from the
Jinja2 templates in ``tunelab/templates``, with autoescape on: a run name, a question or an
answer holding ``<script>`` is shown as text, never run. Control characters in such text (a
right-to-left override U+202E that makes a line read backwards, terminal escapes) are shown as
escapes (``\\u202e``) on the page; the data and the JSON results keep them as they are."""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup

from tunelab.text_safety import visible


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tunelab", "templates"),
        autoescape=True,  # every template here is HTML or SVG
        undefined=jinja2.StrictUndefined,  # a misspelt name fails loudly in the tests
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_shown,
    )


def _shown(value: Any) -> Any:
    """Every ``{{ value }}`` before escaping: text with its control characters made visible
    (HTML escaping leaves them, and a browser obeys a bidirectional override). Markup is a
    rendered template or tunelab's own constant, already shown this way."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return visible(value)
    return value


def render(template: str, **context: Any) -> str:
    """The template ``tunelab/templates/<template>`` filled with ``context`` (autoescaped;
    pass markup that is already safe as ``markupsafe.Markup``)."""
    return _environment().get_template(template).render(**context)
