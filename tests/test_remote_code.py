"""No command runs a model folder's own Python code unless trust_remote_code allows it (#17).

The model folder below ships ``marker_model.py`` (named by ``auto_map``), which writes a marker
file when imported. Every command is run on it with trust_remote_code off and must neither
create the marker nor ask on the terminal (``input`` answers "y" here, as a user might), and
must end in one named error.
"""

from __future__ import annotations

import builtins
import json
import re
import shutil
from pathlib import Path

import pytest

from tunelab.api import FineTuner
from tunelab.cli import main

MARKER_MODULE = """
import os
from pathlib import Path

Path(os.environ["TUNELAB_TEST_MARKER"]).write_text("custom code ran")
print("CUSTOM CODE IMPORTED", flush=True)

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class MarkerConfig(LlamaConfig):
    model_type = "tunelab_marker"


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig


class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
"""


def custom_code_model(source: Path, folder: Path) -> Path:
    """A copy of the tiny model whose config, model and tokenizer classes live in its own
    Python file (as hub repositories with custom code ship them)."""
    shutil.copytree(source, folder)
    (folder / "marker_model.py").write_text(MARKER_MODULE)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tunelab_marker"
    config["auto_map"] = {
        "AutoConfig": "marker_model.MarkerConfig",
        "AutoModelForCausalLM": "marker_model.MarkerForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "MarkerTokenizer"
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "marker_model.MarkerTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@pytest.fixture
def custom(tiny_model_dir, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("TUNELAB_TEST_MARKER", str(marker))
    prompts: list[str] = []

    def answer_yes(prompt: str = "") -> str:
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    # a unique folder name: transformers caches imported custom modules by it
    folder = custom_code_model(tiny_model_dir, tmp_path / f"custom_{tmp_path.name}")
    return folder, marker, prompts


def _refused(code: int, err: str, marker: Path, prompts: list[str]) -> None:
    assert not marker.exists(), "the model folder's custom code ran"
    assert prompts == [], f"asked on the terminal: {prompts}"
    assert code == 2, err
    assert "custom Python code" in err and "trust_remote_code: true" in err, err


@pytest.fixture
def run_on_custom_base(make_config, tmp_path, custom):
    """A run trained on the plain tiny model, then pointed at the custom-code copy as base."""
    FineTuner(make_config(max_steps=1)).train()
    run = tmp_path / "run"
    folder = custom[0]
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(folder)
    (run / "adapter_config.json").write_text(json.dumps(adapter_config))
    info = json.loads((run / "run_info.json").read_text())
    info["base_model"] = str(folder)
    (run / "run_info.json").write_text(json.dumps(info))
    return run


def test_train_refuses_custom_code(custom, make_config, tmp_path, capsys):
    folder, marker, prompts = custom
    config = make_config(model_name=str(folder))
    path = tmp_path / "c.yaml"
    config.save(path)
    _refused(main(["train", str(path)]), capsys.readouterr().err, marker, prompts)


@pytest.mark.parametrize("command", ["generate", "export", "estimate", "data-inspect"])
def test_model_commands_refuse_custom_code(custom, command, tmp_path, capsys):
    folder, marker, prompts = custom
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "What is a byte?", "completion": "8 bits."}) + "\n")
    argv = {
        "generate": ["generate", str(folder), "--prompt", "hi"],
        "export": ["export", str(folder), "--out", str(tmp_path / "m.gguf")],
        "estimate": ["estimate", str(folder)],
        "data-inspect": ["data", "inspect", str(data), "--model", str(folder),
                         "--out", str(tmp_path / "r")],
    }[command]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    if command == "estimate":  # estimates read shapes only, and never run a model's code
        assert not marker.exists() and prompts == [] and code == 2
        assert "never run a model's own code" in err, err
        return
    _refused(code, err, marker, prompts)


@pytest.mark.parametrize("command", ["merge", "generate", "eval", "doctor", "export"])
def test_run_commands_refuse_a_custom_code_base(
    run_on_custom_base, custom, command, tmp_path, capsys
):
    folder, marker, prompts = custom
    run = run_on_custom_base
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps({"prompt": "What is a byte?", "completion": "8 bits."}) + "\n")
    argv = {
        "merge": ["merge", str(run), str(tmp_path / "merged")],
        "generate": ["generate", str(run), "--prompt", "hi"],
        "eval": ["eval", str(run), "--eval-path", str(eval_data), "--systems", "base",
                 "--no-forgetting", "--out", str(tmp_path / "e")],
        "doctor": ["doctor", str(run)],
        "export": ["export", str(run), "--out", str(tmp_path / "m.gguf")],
    }[command]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    if command == "doctor":  # doctor skips the base's checks rather than failing the run's
        assert not marker.exists() and prompts == [], "the base's custom code ran"
        assert code in (0, 1), err
        return
    _refused(code, err, marker, prompts)


def test_the_warning_prints_before_any_custom_code_runs(custom, make_config, tmp_path, capsys):
    folder, marker, prompts = custom
    config = make_config(model_name=str(folder), trust_remote_code=True, max_steps=1)
    FineTuner(config).train()
    out = capsys.readouterr().out
    assert marker.exists() and prompts == []
    warning = out.index("warning: trust_remote_code is on")
    assert warning < out.index("CUSTOM CODE IMPORTED"), out


def test_export_of_a_trusted_run_warns_before_its_base_code_runs(
    custom, make_config, tmp_path, capsys
):
    folder, marker, prompts = custom
    run = tmp_path / "trusted-run"
    config = make_config(
        model_name=str(folder), trust_remote_code=True, max_steps=1, output_dir=str(run)
    )
    FineTuner(config).train()
    marker.unlink()
    from tunelab import models

    models._WARNED_REMOTE_CODE.clear()  # a fresh process, as `tunelab export` is
    capsys.readouterr()
    main(["export", str(run), "--out", str(tmp_path / "m.gguf"), "--no-check"])
    out = capsys.readouterr().out
    assert marker.exists() and prompts == []
    assert out.index("warning: trust_remote_code is on") < out.index("CUSTOM CODE IMPORTED"), out


def test_generate_runs_custom_code_only_with_the_flag(custom, capsys):
    folder, marker, prompts = custom
    argv = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*argv, "--trust-remote-code"]) == 0
    out = capsys.readouterr().out
    assert marker.exists() and prompts == []
    assert out.index("warning: trust_remote_code is on") < out.index("CUSTOM CODE IMPORTED")


def test_no_load_bypasses_the_helpers():
    """Every from_pretrained / from_config call outside tunelab/models.py passes
    trust_remote_code explicitly; PEFT adapters load only through tunelab.models."""
    package = Path(__file__).resolve().parents[1] / "tunelab"
    offenders = []
    for path in package.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"\.(from_pretrained|from_config|load_adapter)\(", text):
            if path.name == "models.py" and path.parent == package:
                continue
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start() : end + 1]
            through_peft = (
                match.group(1) == "load_adapter"
                or "PeftModel" in text[max(0, match.start() - 20) : match.start()]
            )
            if through_peft or "trust_remote_code" not in call:
                offenders.append(f"{path.relative_to(package)}: {call[:60]}")
    assert offenders == [], offenders
    assert "load_dataset(" not in "".join(p.read_text() for p in package.rglob("*.py"))
