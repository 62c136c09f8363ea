"""Chat templates rendered under limits, with errors that name the template.

A chat template is Jinja code shipped with a model (``chat_template.jinja``, or
``tokenizer_config.json``): untrusted code. transformers renders it in Jinja's immutable
sandbox, which stops attribute tricks and caps ``range`` but not ``'x' * 10000000000``, a
doubling loop, ``'x'|center(10**10)`` or ``'%9999999999s' % x``: a few bytes of template can
take every byte of memory. ``render_chat`` is how tunelab renders every chat: it makes
transformers compile templates into ``LimitedSandbox`` (its own environment, extensions and
globals, built by its own code, only the environment class swapped), so every value a
template builds, the output, and the time spent are capped; a template that breaks a limit, a
sandbox rule or its own ``raise_exception`` ends in a ``TunelabError`` naming the template.
Within the limits the output is transformers' own, character for character.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.errors import TunelabError

# the longest string (and output) a template may build: this, or 4x the size of what it was
# given when that is more (a long conversation renders to a long text)
MAX_CHARS = 16 << 20
MAX_ITEMS = 1 << 16  # the longest list a template may build by repetition
MAX_SECONDS = 20.0  # one render; legitimate templates take milliseconds
_WIDTH = re.compile(r"[%{:][^%{}:]*?(\d{7,})")  # a format width or precision of 1e6+
# (deadline, character limit) of the render under way
_render: contextvars.ContextVar[tuple[float, int]] = contextvars.ContextVar(
    "tunelab_template_render", default=(0.0, MAX_CHARS)
)


def _limit() -> int:
    return _render.get()[1]


class TemplateLimitError(SecurityError):
    """A template tried to build more than the limits allow."""


def _size(value: Any, budget: int | None = None) -> int:
    """Characters in ``value`` and what it holds, counted until ``budget`` is passed."""
    budget = _limit() if budget is None else budget
    total, stack = 0, [value]
    while stack and total <= budget:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, list | tuple | set | frozenset):
            total += len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            total += 1
    return total


def _refuse(what: str) -> TemplateLimitError:
    return TemplateLimitError(f"{what} (limit {_limit():,} characters)")


def _check_size(value: Any, what: str) -> Any:
    if _size(value) > _limit():
        raise _refuse(f"{what} builds a value too large")
    if isinstance(value, list | tuple) and len(value) > MAX_ITEMS * 16:
        raise _refuse(f"{what} builds a list too long")
    return value


def _check_time() -> None:
    deadline = _render.get()[0]
    if deadline and time.monotonic() > deadline:
        raise TemplateLimitError(f"rendering took longer than {MAX_SECONDS:.0f} s")


def _check_arguments(args: Iterable[Any], kwargs: dict[str, Any], what: str) -> None:
    # widths (center, ljust, zfill, indent, ...) build strings of that many characters
    for value in [*args, *kwargs.values()]:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _limit():
            raise _refuse(f"{what} is given the number {value}, too large")


def _expected_size(name: str, text: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """What a known amplifying string operation will produce, before it runs (0 if unknown):
    ``text`` is the string operated on, ``args`` the rest."""
    if not isinstance(text, str):
        return 0
    if name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        return len(text) + (text.count(old) if old else len(text) + 1) * len(new)
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        width = width if isinstance(width, int) else len(str(width))
        return len(text) + (text.count("\n") + 1) * max(width, 0)
    if name == "wordwrap":
        width = args[0] if args else kwargs.get("width", 79)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        return len(text) + (len(text) // max(int(width), 1) + 1) * len(str(wrap))
    if name in ("format", "format_map") and _WIDTH.search(text):
        return _limit() + 1
    return 0


def _joined_size(separator: Any, items: Any) -> int:
    """The length of ``separator.join(items)``, counted before joining."""
    if not isinstance(items, list | tuple):
        return 0
    return _size(items) + len(str(separator)) * len(items)


def _limited_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def limited(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        values = [a for a in args if not _is_context(a)]
        _check_arguments(values[1:], kwargs, f"the filter '{name}'")
        base = values[0] if values else None
        expected = _expected_size(name, base, tuple(values[1:]), kwargs)
        if name == "join":
            expected = _joined_size(values[1] if len(values) > 1 else "", base)
        if expected > _limit():
            raise _refuse(f"the filter '{name}' would build a value too large")
        if name in ("string", "tojson", "pprint", "list") and _size(base) > _limit():
            raise _refuse(f"the filter '{name}' is given a value too large")
        return _check_size(function(*args, **kwargs), f"the filter '{name}'")

    limited.jinja_pass_arg = getattr(function, "jinja_pass_arg", None)  # type: ignore[attr-defined]
    return limited


def _is_context(value: Any) -> bool:
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return isinstance(value, Context | EvalContext) or hasattr(value, "sandboxed")


def _capped_concat(parts: Iterable[str]) -> str:
    """The output, joined while counting: a template that prints too much stops at the limit."""
    out, total = [], 0
    for part in parts:
        total += len(part)
        if total > _limit():
            raise _refuse("the template's output is too large")
        out.append(part)
    return "".join(out)


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every value a template builds capped (strings at
    ``MAX_CHARS``, repeated lists at ``MAX_ITEMS``), numbers kept small, and a time limit."""

    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.concat = _capped_concat  # type: ignore[method-assign]

    def from_string(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        # filters are bound when a template compiles: wrap the final set (transformers adds
        # its own tojson after building the environment)
        for name, function in list(self.filters.items()):
            if not getattr(function, "tunelab_limited", False):
                wrapped = _limited_filter(name, function)
                wrapped.tunelab_limited = True  # type: ignore[attr-defined]
                self.filters[name] = wrapped
        namespace = self.globals.get("namespace")
        if isinstance(namespace, type) and not getattr(namespace, "tunelab_limited", False):
            self.globals["namespace"] = _limited_namespace(namespace)
        return super().from_string(source, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if operator == "*":
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, str | list | tuple) and isinstance(count, int):
                cap = _limit() if isinstance(sequence, str) else MAX_ITEMS
                if len(sequence) * count > cap:
                    raise _refuse(f"'{operator}' would repeat a value {count} times, too large")
        elif operator == "+" and isinstance(left, str | list | tuple):
            _check_size((left, right), "'+'")
        elif operator == "%" and isinstance(left, str):
            if _WIDTH.search(left):
                raise _refuse("'%' is given a format width too large")
            _check_size((left, right), "'%'")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 64 and abs(left) > 1 and right * max(abs(left).bit_length(), 1) > 4096:
                raise _refuse(f"'{left} ** {right}' is too large a number")
        return _check_size(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_time()
        name = getattr(__obj, "__name__", type(__obj).__name__)
        base = getattr(__obj, "__self__", None)
        what = f"the call '{name}'"
        _check_arguments(args, kwargs, what)
        _check_size((args, kwargs), what)  # a macro recursing on a doubling argument
        expected = _expected_size(name, base, args, kwargs)
        if name == "join" and isinstance(base, str) and args:
            expected = _joined_size(base, args[0])
        if expected > _limit():
            raise _refuse(f"{what} would build a value too large")
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_size(result, what)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        # the sandbox hands out str.format wrapped (no __self__ left to check at the call)
        if isinstance(obj, str) and attribute in ("format", "format_map") and _WIDTH.search(obj):
            raise _refuse(f"the call '{attribute}' is given a format width too large")
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)


def _limited_namespace(namespace: type) -> type:
    class LimitedNamespace(namespace):
        tunelab_limited = True

        def __setitem__(self, name: str, value: Any) -> None:
            _check_time()
            _check_size(value, f"setting namespace.{name}")
            super().__setitem__(name, value)

    return LimitedNamespace


# --- making transformers compile into LimitedSandbox ---------------------------------------------

_install_lock = threading.Lock()


def _install() -> None:
    """Route transformers' template compilation through ``LimitedSandbox`` (once)."""
    from transformers.utils import chat_template_utils as ctu

    if getattr(ctu._compile_jinja_template, "tunelab_limited", False):
        return
    # transformers' uncached builder: named since 5.x, else the function under its lru_cache
    build = getattr(ctu, "_cached_compile_jinja_template", None) or getattr(
        ctu._compile_jinja_template, "__wrapped__", None
    )
    if build is None or not hasattr(ctu, "ImmutableSandboxedEnvironment"):
        # a transformers whose template code moved: say so rather than pretend to limit it
        raise TunelabError(
            "this transformers version renders chat templates in a way tunelab cannot limit "
            f"(transformers {getattr(__import__('transformers'), '__version__', '?')}); install "
            "the version in tunelab's requirements (pip install 'transformers>=5,<6')."
        )
    with _install_lock:
        if getattr(ctu._compile_jinja_template, "tunelab_limited", False):
            return

        @functools.lru_cache(maxsize=64)
        def compile_limited(source: str) -> Any:
            # transformers' own builder (extensions, globals, filters), our environment class
            with _build_lock:
                original = ctu.ImmutableSandboxedEnvironment
                # swapping the class transformers builds with is the point: mypy refuses
                # assigning to a class name, which this deliberately does
                ctu.ImmutableSandboxedEnvironment = LimitedSandbox  # type: ignore[misc]
                try:
                    template = build(source)
                finally:
                    ctu.ImmutableSandboxedEnvironment = original  # type: ignore[misc]
            if not isinstance(getattr(template, "environment", None), LimitedSandbox):
                raise TunelabError(
                    "this transformers version builds its chat-template sandbox in a way "
                    "tunelab cannot limit; install transformers>=5,<6 as tunelab requires."
                )
            return _TimedTemplate(template)

        compile_limited.tunelab_limited = True  # type: ignore[attr-defined]
        ctu._compile_jinja_template = compile_limited


_build_lock = threading.Lock()


class _TimedTemplate:
    """A compiled template whose ``render`` runs under the time limit."""

    def __init__(self, template: Any) -> None:
        self.template = template

    def render(self, *args: Any, **kwargs: Any) -> str:
        limit = max(MAX_CHARS, 4 * _size((args, kwargs), 1 << 40))
        token = _render.set((time.monotonic() + MAX_SECONDS, limit))
        try:
            return self.template.render(*args, **kwargs)
        finally:
            _render.reset(token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.template, name)


def template_source(tokenizer: Any) -> str:
    """Where a tokenizer's chat template comes from, for messages."""
    where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"the chat template of {where} (chat_template.jinja or tokenizer_config.json)"


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], allow_empty: bool = False, **kwargs: Any
) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)`` under the limits.

    Raises ``TunelabError`` naming the template when it breaks a limit or a sandbox rule,
    raises its own error, or (unless ``allow_empty``: a prefix of a conversation may render
    to nothing) renders nothing for a conversation that has content.
    """
    _install()
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateLimitError as exc:
        raise TunelabError(
            f"{template_source(tokenizer)} was stopped: {exc}. A chat template is code from "
            "the model's author; use a model whose template does not do this, or replace its "
            "chat_template.jinja."
        ) from None
    except SecurityError as exc:
        raise TunelabError(
            f"{template_source(tokenizer)} tried something the sandbox forbids ({exc}); it "
            "may be malicious. Do not use this model's template: replace its chat_template.jinja."
        ) from None
    except TemplateError as exc:
        raise TunelabError(
            f"{template_source(tokenizer)} failed: {exc}. Check that the data's roles and "
            "message order suit this template (some require alternating user/assistant turns "
            "or no system message), or use chat_format: plain."
        ) from None
    except RecursionError:
        raise TunelabError(f"{template_source(tokenizer)} recursed too deeply.") from None
    except MemoryError:
        raise TunelabError(
            f"{template_source(tokenizer)} ran out of memory while rendering; it may be "
            "malicious. Replace its chat_template.jinja."
        ) from None
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
        # the template's own expressions failing at run time ({{ 1/0 }}, 'a' + 1, ...)
        raise TunelabError(
            f"{template_source(tokenizer)} failed while rendering ({type(exc).__name__}: "
            f"{str(exc)[:200]}). The template has a bug, or expects messages in another shape; "
            "fix or replace its chat_template.jinja, or use chat_format: plain."
        ) from None
    if not isinstance(rendered, str):
        rendered = str(rendered)
    has_content = any(str(m.get("content") or "").strip() for m in messages)
    if has_content and not allow_empty and not rendered.strip():
        raise TunelabError(
            f"{template_source(tokenizer)} rendered an empty text for a conversation with "
            f"content ({len(messages)} message(s)); training on it would learn nothing. Check "
            "the template, or use chat_format: plain."
        )
    return rendered


__all__ = ["LimitedSandbox", "MAX_CHARS", "TemplateLimitError", "render_chat", "template_source"]
