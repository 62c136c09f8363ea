"""Ollama Modelfiles: the Go TEMPLATE chosen for each family renders single- and multi-turn chats
exactly as the trained Jinja template does; untranslatable templates are refused."""

import gguf
import pytest
from conftest import CHATML
from transformers import AutoTokenizer

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.shipping.ollama import (
    GO_TEMPLATES,
    ollama_render,
    render_go_template,
    translate_chat_template,
    write_modelfile,
)

# The families' templates as their model cards ship them (Gemma 2, Phi-3-mini, Llama 3 8B
# Instruct, Mistral 7B Instruct v0.1), trimmed of nothing that matters for these chats.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = "
    "message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim "
    "+ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}"
    "{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
FAMILIES = {
    # family: (Jinja template, bos, end of turn, system prompts the template accepts)
    "chatml": (CHATML, "<|im_start|>", "<|im_end|>", True),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    "gemma": (GEMMA, "<bos>", "<end_of_turn>", False),
    "phi3": (PHI3, "<s>", "<|end|>", True),
    "mistral": (MISTRAL, "<s>", "</s>", False),
}
CHATS = [
    [{"role": "user", "content": "Define kernel."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is TCP?"},
        {"role": "assistant", "content": "A transport protocol."},
        {"role": "user", "content": "Thanks.\nBye"},
    ],
]


def family_tokenizer(tiny_model_dir, family, folder=None):
    template, bos, end, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens(
        {"bos_token": bos, "eos_token": end, "additional_special_tokens": [bos, end]}
    )
    tokenizer.chat_template = template
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_go_template_renders_like_the_jinja_template(family, tiny_model_dir):
    tokenizer = family_tokenizer(tiny_model_dir, family)
    system_ok = FAMILIES[family][3]
    system = "You answer in one sentence." if system_ok else None
    found, template = translate_chat_template(tokenizer, system)
    assert found.startswith(family)
    for chat in CHATS:
        messages = ([{"role": "system", "content": system}] if system else []) + chat
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(template, chat, system) == want, (family, chat)


def test_go_template_evaluator_subset():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "x", "Content": "b"}]}
    template = (
        '{{- range .Messages }}  {{- if eq .Role "user" }}U:{{ .Content }}'
        "{{ else if .Content }}O:{{ .Content }}{{ else }}?{{ end }}\n{{- end }}!"
    )
    assert render_go_template(template, data) == "U:aO:b!"
    assert render_go_template("{{ .System }} -{{- .Missing -}}- x", {"System": "s"}) == "s -- x"


def test_untranslatable_templates_are_refused(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(TunelabError, match="not one tunelab can translate for Ollama"):
        translate_chat_template(tokenizer, None)
    # Gemma's template refuses system prompts, so a run trained with one cannot be translated
    with pytest.raises(TunelabError, match="not one tunelab can translate"):
        translate_chat_template(family_tokenizer(tiny_model_dir, "gemma"), "Be brief.")
    tokenizer.chat_template = None
    with pytest.raises(TunelabError, match="no chat template"):
        translate_chat_template(tokenizer, None)


def test_export_format_ollama_writes_gguf_and_modelfile(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ollama" / "tiny.gguf"
    assert (
        main(["export", str(tiny_model_dir), "--format", "ollama", "--out", str(out), "--no-check"])
        == 0
    )
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.splitlines()[1] == "FROM ./tiny.gguf"
    assert f'TEMPLATE """{GO_TEMPLATES["chatml"]}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "SYSTEM" not in modelfile
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert "Modelfile" in capsys.readouterr().out


def test_modelfile_carries_the_runs_system_prompt(tiny_model_dir, tmp_path):
    tokenizer = family_tokenizer(tiny_model_dir, "phi3")
    path = write_modelfile(tmp_path / "m.gguf", tokenizer, "Be brief.", tmp_path / "Modelfile")
    text = path.read_text()
    assert 'SYSTEM """Be brief."""' in text and 'PARAMETER stop "<|end|>"' in text


def test_a_users_modelfile_is_never_replaced(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    mine = tmp_path / "Modelfile"
    mine.write_text("FROM llama3\n")
    with pytest.raises(TunelabError, match="not written by tunelab"):
        write_modelfile(tmp_path / "m.gguf", tokenizer, None, mine)
    assert mine.read_text() == "FROM llama3\n"


def test_export_refuses_a_users_modelfile_before_writing_the_gguf(tiny_model_dir, tmp_path, capsys):
    # all or nothing: the user's Modelfile is found before the GGUF file is written
    out = tmp_path / "e" / "tiny.gguf"
    out.parent.mkdir()
    (out.parent / "Modelfile").write_text("FROM my\n")
    argv = ["export", str(tiny_model_dir), "--format", "ollama", "--type", "f16"]
    assert main([*argv, "--no-check", "--out", str(out), "--overwrite"]) == 2
    assert "Modelfile exists and was not written by tunelab" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["Modelfile"]
    assert (out.parent / "Modelfile").read_text() == "FROM my\n"


def test_an_earlier_exports_modelfile_is_not_replaced_silently(tiny_model_dir, tmp_path, capsys):
    # two runs exported into one folder: the second Modelfile would point Ollama at its GGUF
    # and lose the first's, so it is refused before anything is written, unless --overwrite
    folder = tmp_path / "exports"
    argv = ["export", str(tiny_model_dir), "--format", "ollama", "--no-check", "--out"]
    assert main([*argv, str(folder / "a.gguf")]) == 0
    capsys.readouterr()
    assert main([*argv, str(folder / "b.gguf")]) == 2
    said = capsys.readouterr().err
    assert "Modelfile is the Modelfile of an earlier export (FROM ./a.gguf)" in said, said
    assert "--overwrite" in said
    assert not (folder / "b.gguf").exists()
    assert (folder / "Modelfile").read_text().splitlines()[1] == "FROM ./a.gguf"
    assert main([*argv, str(folder / "b.gguf"), "--overwrite"]) == 0
    assert (folder / "Modelfile").read_text().splitlines()[1] == "FROM ./b.gguf"
