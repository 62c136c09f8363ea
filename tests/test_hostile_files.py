"""Hostile or damaged files end in one named error naming the file, never a traceback (#17):
refused pickles, damaged safetensors headers, invalid saved YAML, chat template Jinja errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tunelab.api import FineTuner
from tunelab.cli import main


class _RunsCode:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, (f"touch {self.marker}",))


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def run(make_config, tmp_path) -> Path:
    FineTuner(make_config(max_steps=2, save_steps=1)).train()
    return tmp_path / "run"


def test_runs_list_skips_a_run_with_invalid_saved_yaml(run, tmp_path, capsys):
    other = tmp_path / "runs" / "broken"
    shutil.copytree(run, tmp_path / "runs" / "good")
    other.mkdir(parents=True)
    (other / "tunelab_config.yaml").write_text("method: lora\nlearning_rate: [1e-4\n")
    assert main(["runs", "list", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "good" in out.splitlines()[2]
    assert f"skipped {other}: {other / 'tunelab_config.yaml'} line" in out
    assert "not valid YAML" in out


def test_resume_with_invalid_saved_yaml_names_the_file(run, make_config, capsys):
    (run / "tunelab_config.yaml").write_text("method: [lora\n")
    with pytest.raises(Exception, match=r"tunelab_config.yaml line \d+: not valid YAML") as info:
        FineTuner(make_config(max_steps=3, save_steps=1)).train(resume=True)
    assert type(info.value).__name__ == "TunelabError"


def test_a_pickled_adapter_is_refused_by_name(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (run / "adapter_model.safetensors").unlink()
    torch.save({"weights": _RunsCode(marker)}, run / "adapter_model.bin")
    generate = ["generate", str(run), "--prompt", "hi"]
    for argv in (generate, ["merge", str(run), str(tmp_path / "m")]):
        err = _error(argv, capsys)
        assert "a pickled adapter file was refused" in err and str(run) in err, err
    assert not marker.exists()


def test_a_damaged_safetensors_header_is_named(run, tmp_path, capsys, tiny_model_dir):
    (run / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    err = _error(["generate", str(run), "--prompt", "hi"], capsys)
    # named by the run-folder check (files.check_safetensors) before any library parses it
    assert "adapter_model.safetensors is damaged" in err and str(run) in err, err
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad header}  ")
    err = _error(["generate", str(model), "--prompt", "hi"], capsys)
    assert "model.safetensors is damaged" in err and str(model) in err, err


def test_a_checkpoint_holding_a_pickle_or_a_bad_header_is_named(run, make_config, tmp_path):
    from tunelab.errors import TunelabError

    marker = tmp_path / "PWNED"
    last = sorted((run / "checkpoints").iterdir())[-1]
    torch.save({"optimizer": _RunsCode(marker)}, last / "training_state.pt")
    with pytest.raises(TunelabError, match=r"training_state.pt holds Python objects"):
        FineTuner(make_config(max_steps=3, save_steps=1)).train(resume=True)
    assert not marker.exists()
    (last / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(TunelabError, match=r"adapter_model.safetensors is damaged"):
        FineTuner(make_config(max_steps=3, save_steps=1)).train(resume=True)


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{% for m in messages %}{{ m['content'] }", "unexpected '}'"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ raise_exception('no system role') }}", "no system role"),
    ],
)  # fmt: skip
def test_chat_template_errors_name_the_template(template, expected, make_config, tmp_path,
                                                 tiny_model_dir, capsys):  # fmt: skip
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(template)
    config = make_config(model_name=str(model), chat_format="chat")
    path = tmp_path / "c.yaml"
    config.save(path)
    for argv in (["train", str(path)], ["data", "preview", str(path)],
                 ["generate", str(model), "--prompt", "hi"]):  # fmt: skip
        err = _error(argv, capsys)
        assert expected in err and f"the chat template of {model}" in err, (argv, err)
