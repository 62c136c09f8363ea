"""Chat templates are code from a model's author: rendered under limits, errors named.

The bombs run in a subprocess under a 2 GiB address-space cap (importing torch and
transformers takes about 0.7 GiB) and must each end in a TunelabError naming the template.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.data.prepare import load_examples
from tunelab.data.tokenize import render_prompt, tokenize_example
from tunelab.errors import TunelabError

ROOT = Path(__file__).resolve().parents[1]
MEMORY_CAP = 2 << 30

BOMBS = {
    "string times": "{{ 'x' * 10000000000 }}",
    "list times": "{{ (['x'] * 10000000000)|length }}",
    "center": "{{ 'x'|center(10000000000) }}",
    "ljust": "{{ 'x'.ljust(10000000000) }}",
    "percent width": "{{ '%9999999999s' % 'x' }}",
    "format width": "{{ '{:>9999999999}'.format('x') }}",
    "namespace doubling": "{% set ns = namespace(s='x') %}{% for i in range(100) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "plus doubling": "{% set ns = namespace(s='x') %}{% for i in range(100) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "macro doubling": "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}"
    "{{ s|length }}{% endif %}{% endmacro %}{{ f('x', 60) }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "xxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
    "replace": "{% set s = 'x' * 10000 %}{{ s.replace('x', s)|length }}",
    "replace filter": "{% set s = 'x' * 10000 %}{{ s|replace('x', s)|length }}",
    "join": "{% set s = 'x' * 1000000 %}{{ ([s] * 60000)|join|length }}",
    "indent": "{% set s = 'x\\n' * 1000000 %}{{ s|indent(1000)|length }}",
    "power": "{{ 10 ** 1000000000 }}",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_template_bombs_end_in_a_named_error_under_a_memory_cap(tiny_model_dir):
    script = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))\n"
        "import torch\n"
        "from transformers import AutoTokenizer\n"
        "from tunelab.data.tokenize import render_prompt\n"
        "from tunelab.errors import TunelabError\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})\n"
        "results = {}\n"
        f"for name, template in json.loads({json.dumps(json.dumps(BOMBS))}).items():\n"
        "    tokenizer.chat_template = template\n"
        "    try:\n"
        "        render_prompt(tokenizer, 'hello', chat=True)\n"
        "        results[name] = 'NO ERROR'\n"
        "    except TunelabError as exc:\n"
        "        results[name] = 'OK ' + str(exc)\n"
        "    except BaseException as exc:\n"
        "        results[name] = 'RAW ' + type(exc).__name__\n"
        "status = open('/proc/self/status').read()\n"
        "results['peak'] = int(status.split('VmPeak:')[1].split()[0]) << 10\n"
        "print(json.dumps(results))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("peak") < MEMORY_CAP * 0.75
    for name, result in results.items():
        assert result.startswith("OK "), f"{name}: {result}"
        assert f"the chat template of {tiny_model_dir}" in result and "stopped" in result, result


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('true') }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    ],
    ids=["subclasses", "globals", "namespace dunder"],
)
def test_sandbox_escapes_end_in_a_named_error(tokenizer, template):
    tokenizer.chat_template = template
    with pytest.raises(TunelabError, match="tried something the sandbox forbids"):
        render_prompt(tokenizer, "hello", chat=True)


def test_an_empty_render_of_a_real_example_is_an_error(tokenizer, tmp_path):
    from tunelab.data.schema import Example

    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'x' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    example = Example("d.jsonl:1", prompt="Q?", completion="A.")
    with pytest.raises(TunelabError, match=r"rendered an empty text .*2 message"):
        tokenize_example(example, tokenizer, 64, chat=True)


def test_a_template_error_names_the_template(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(TunelabError) as err:
        render_prompt(tokenizer, "hello", chat=True)
    assert "Conversation roles must alternate" in str(err.value)
    assert str(tokenizer.name_or_path) in str(err.value)


@pytest.mark.parametrize(
    "template, kind",
    [
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{{ messages|int + 'a' }}", "TypeError"),
        ("{{ messages[99].content }}", "UndefinedError|IndexError|failed"),
    ],
    ids=["division by zero", "type error", "index"],
)
def test_a_template_failing_at_run_time_is_a_named_error(tokenizer, template, kind):
    tokenizer.chat_template = template
    with pytest.raises(TunelabError) as err:
        render_prompt(tokenizer, "hello", chat=True)
    message = str(err.value)
    assert str(tokenizer.name_or_path) in message and "\n" not in message
    assert re.search(kind, message), message


TEMPLATES = {
    "chatml": None,  # the tiny model's own
    "generation prompt": "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    "namespace and tojson": "{% set ns = namespace(n=0) %}{% for m in messages %}"
    "{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}{% endfor %}{{ eos_token }}",
    "loop controls": "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{{ m.content.upper() ~ '|' ~ ('-' * 3) }}{% endfor %}",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_within_the_limits_the_output_is_transformers_own(tokenizer, name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tunelab.template_sandbox import render_chat

    template = (
        TEMPLATES[name] or AutoTokenizer.from_pretrained(tokenizer.name_or_path).chat_template
    )
    tokenizer.chat_template = template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a byte? <b>|`x`"},
        {"role": "assistant", "content": "Eight bits."},
    ]
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, **_: json.dumps(x, ensure_ascii=False)
    plain = env.from_string(template)
    for prompt in (False, True):
        expected = plain.render(
            messages=messages, add_generation_prompt=prompt, eos_token=tokenizer.eos_token,
            bos_token=tokenizer.bos_token,
        )  # fmt: skip
        assert render_chat(tokenizer, messages, add_generation_prompt=prompt) == expected


def test_long_conversations_still_render(tokenizer, tiny_model_dir):
    """The limit grows with what the template is given: a 20 MB message renders whole."""
    from tunelab.template_sandbox import MAX_CHARS, render_chat

    tokenizer.chat_template = AutoTokenizer.from_pretrained(str(tiny_model_dir)).chat_template
    content = "word " * (MAX_CHARS // 4)
    rendered = render_chat(tokenizer, [{"role": "user", "content": content}])
    assert content in rendered and len(rendered) > MAX_CHARS


@pytest.mark.parametrize(
    "template, found",
    [("{term.__class__}", "{term.__class__}"), ("{term:>99999}", "{term:>99999}")],
    ids=["attribute", "width"],
)
def test_prompt_templates_take_plain_fields_only(tmp_path, template, found):
    from tunelab.config import FineTuningConfig

    path = tmp_path / "d.jsonl"
    path.write_text('{"term": "byte", "definition": "Eight bits."}\n')
    config = FineTuningConfig(
        dataset_path=str(path), prompt_template=template, completion_template="{definition}"
    )
    with pytest.raises(TunelabError) as err:
        load_examples(path, config)
    assert f"has the field {found}" in str(err.value) and "prompt_template" in str(err.value)
