"""Ollama: a Modelfile beside the GGUF file, whose TEMPLATE (a Go template), stop parameters and
system prompt reproduce the chat template the run trained with.

A Jinja chat template cannot be translated in general, so the translation is by family: each
known layout (ChatML, Llama 3, Gemma, Phi-3, Mistral) has a Go template, and the one chosen is
the one whose rendering, by the small Go-template evaluator below, equals the Jinja rendering
on single- and multi-turn chats, with and without a system prompt. No match: refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.template_sandbox import render_chat

_HEADER = "# written by tunelab"
# Ollama passes the system prompt as the first message of .Messages.
GO_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "{{- range .Messages }}<start_of_turn>"
        '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
    ),
    "phi3": (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
    ),
    "mistral": (
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'
    ),
    "mistral-spaced": (
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}'
    ),
}

_PROBE_CHATS = [
    [{"role": "user", "content": "What is a byte?"}],
    [
        {"role": "user", "content": "What is a byte?"},
        {"role": "assistant", "content": "Eight bits."},
        {"role": "user", "content": "And a kernel?"},
    ],
]


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render the subset of Go's text/template that ``GO_TEMPLATES`` use: text, ``{{ .Field }}``,
    ``{{ range .Messages }}``, ``{{ if .Field }}`` / ``{{ if eq .Field "text" }}`` with
    ``else if`` / ``else``, ``end``, and the ``{{-`` / ``-}}`` whitespace trims."""
    tokens = _tokenize(template)
    nodes, rest = _parse(tokens, 0)
    if rest != len(tokens):
        raise TunelabError(f"Go template: unexpected {tokens[rest][1]!r}")
    return _run(nodes, data)


def _tokenize(template: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    for match in re.finditer(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", template, re.S):
        text = template[position : match.start()]
        if match.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim-next":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        if match.group(3):
            tokens.append(("trim-next", ""))
        position = match.end()
    text = template[position:]
    if tokens and tokens[-1][0] == "trim-next":
        tokens.pop()
        text = text.lstrip()
    tokens.append(("text", text))
    return tokens


def _parse(tokens: list[tuple[str, str]], index: int) -> tuple[list[Any], int]:
    """Nodes up to (not including) an ``end``/``else`` action; returns them and that index."""
    nodes: list[Any] = []
    while index < len(tokens):
        kind, value = tokens[index]
        if kind == "text":
            nodes.append(("text", value))
            index += 1
        elif value == "end" or value.startswith("else"):
            return nodes, index
        elif value.startswith("range "):
            body, index = _parse(tokens, index + 1)
            nodes.append(("range", value[6:].strip(), body))
            index += 1  # the end
        elif value.startswith("if "):
            branches = []
            condition = value[3:].strip()
            while True:
                body, index = _parse(tokens, index + 1)
                branches.append((condition, body))
                closing = tokens[index][1]
                if closing == "end":
                    break
                condition = closing[8:].strip() if closing.startswith("else if ") else "true"
            nodes.append(("if", branches))
            index += 1
        else:
            nodes.append(("value", value))
            index += 1
    return nodes, index


def _lookup(expression: str, data: dict[str, Any]) -> Any:
    if not expression.startswith("."):
        raise TunelabError(f"Go template: {expression!r} is outside the supported subset")
    return data.get(expression[1:], "")


def _truthy(condition: str, data: dict[str, Any]) -> bool:
    if condition == "true":
        return True
    match = re.fullmatch(r'eq (\.\w+) "([^"]*)"', condition)
    if match:
        return _lookup(match.group(1), data) == match.group(2)
    return bool(_lookup(condition, data))


def _run(nodes: list[Any], data: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(str(_lookup(node[1], data)))
        elif node[0] == "range":
            for item in _lookup(node[1], data):
                out.append(_run(node[2], {**data, **item}))
        else:
            for condition, body in node[1]:
                if _truthy(condition, data):
                    out.append(_run(body, data))
                    break
    return "".join(out)


def ollama_render(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    """What Ollama renders: SYSTEM becomes the first message unless the chat brings one."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    items = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return render_go_template(template, {"Messages": items, "System": system or ""})


def translate_chat_template(tokenizer: Any, system_prompt: str | None) -> tuple[str, str]:
    """The (family, Go template) whose Ollama rendering equals ``tokenizer``'s Jinja rendering
    on probe chats (as tunelab renders them: ``system_prompt`` first when given). A leading BOS
    that the tokenizer adds by itself is left to llama.cpp, which adds it too. Raises
    TunelabError naming the template when no family matches."""
    if not getattr(tokenizer, "chat_template", None):
        raise TunelabError(
            "the model has no chat template, so there is nothing to give Ollama; export "
            "--format gguf and write your own Modelfile TEMPLATE."
        )

    def jinja(messages: list[dict[str, str]]) -> str:
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        bos = tokenizer.bos_token
        if (
            bos
            and text.startswith(bos)
            and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
        ):
            text = text[len(bos) :]
        return text

    system = system_prompt or default_system_prompt(tokenizer)
    bos = tokenizer.bos_token or ""
    for family, template in GO_TEMPLATES.items():
        # the BOS text the template writes itself, when the tokenizer does not add it
        for candidate in (template, f"{bos}{template}" if bos else None):
            if candidate is None:
                continue
            try:
                if all(
                    ollama_render(candidate, chat, system) == jinja(chat) for chat in _PROBE_CHATS
                ):
                    return family, candidate
            except Exception:  # noqa: BLE001 - a template refusing a probe chat does not match
                continue
    raise TunelabError(
        "the chat template is not one tunelab can translate for Ollama (known: "
        f"{', '.join(GO_TEMPLATES)}; a template must render the probe chats identically). Export "
        "--format gguf (the GGUF file carries the Jinja template) and write the Modelfile "
        "TEMPLATE by hand."
    )


def default_system_prompt(tokenizer: Any) -> str | None:
    """A system prompt the template inserts by itself when a chat has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM..."), found by comparing renderings."""
    chat = [{"role": "user", "content": "x"}]
    try:
        bare = render_chat(tokenizer, chat)
    except Exception:  # noqa: BLE001
        return None
    for candidate in re.findall(
        r"system\n(.+?)(?:<\|im_end\|>|<\|eot_id\|>|<\|end\|>)", bare, re.S
    ):
        with_it = render_chat(tokenizer, [{"role": "system", "content": candidate}, *chat])
        if with_it == bare:
            return candidate
    return None


def stop_strings(tokenizer: Any) -> list[str]:
    """The end-of-turn and EOS token texts, which Ollama must stop at."""
    from tunelab.shipping.gguf_export import end_of_turn_id

    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    texts = [tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None]
    return list(dict.fromkeys(t for t in texts if t))


def chat_settings(folder: str | Path) -> tuple[Any, str | None]:
    """A run or model folder's tokenizer (chat template) and the system prompt it trained with."""
    from tunelab.models import load_tokenizer, run_trust_remote_code
    from tunelab.run_folder import read_run_info

    info = read_run_info(folder)
    return load_tokenizer(str(folder), run_trust_remote_code(folder)), info.get("system_prompt")


def check_modelfile_target(
    out_file: Path, gguf_file: Path | None = None, overwrite: bool = False
) -> None:
    """Refuse a Modelfile path that holds a file tunelab did not write (a user's Modelfile is
    never replaced), or, unless ``overwrite``, tunelab's Modelfile of another GGUF file (an
    earlier export into the same folder); export checks this before writing the GGUF file, so
    a refusal leaves nothing half-written."""
    if out_file.is_symlink() or out_file.is_dir():
        raise TunelabError(
            f"{out_file} exists and is not a Modelfile tunelab wrote; move it away or export "
            "with --out into another folder."
        )
    if out_file.exists() and not out_file.read_text(errors="replace").startswith(_HEADER):
        raise TunelabError(
            f"{out_file} exists and was not written by tunelab; move it away or export with "
            "--out into another folder."
        )
    if out_file.exists() and gguf_file is not None and not overwrite:
        lines = out_file.read_text(errors="replace").splitlines()
        source = next((line[len("FROM ") :] for line in lines if line.startswith("FROM ")), None)
        if source != f"./{gguf_file.name}":
            raise TunelabError(
                f"{out_file} is the Modelfile of an earlier export (FROM {source}); writing "
                f"{gguf_file.name}'s would replace it. Export with --out into another folder, "
                "or pass --overwrite to replace it."
            )


def write_modelfile(
    gguf_file: Path,
    tokenizer: Any,
    system_prompt: str | None,
    out_file: Path,
    overwrite: bool = False,
) -> Path:
    """Write an Ollama Modelfile for ``gguf_file`` (referenced by its name, so keep the two
    together); raises TunelabError when the chat template cannot be translated, or when
    ``out_file`` is not tunelab's Modelfile of this GGUF file (unless ``overwrite``)."""
    check_modelfile_target(out_file, gguf_file, overwrite)
    family, template = translate_chat_template(tokenizer, system_prompt)
    system = system_prompt or default_system_prompt(tokenizer)
    lines = [f"{_HEADER}; chat template family: {family}", f"FROM ./{gguf_file.name}"]
    lines.append(f'TEMPLATE """{template}"""')
    for stop in stop_strings(tokenizer):
        lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    out_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_file
