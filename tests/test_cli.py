import json
import subprocess
import sys

import pytest

from tunelab.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_init_writes_a_config_that_train_accepts(tmp_path, tiny_model_dir, qa_rows, capsys):
    path = tmp_path / "run.yaml"
    assert main(["init", str(path)]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert main(["init", str(path)]) == 2
    assert "already exists. Pass --force" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"{r['term']}: {r['definition']}"}) + "\n" for r in qa_rows)
    )
    code = main(
        [
            "train",
            str(path),
            "--set",
            f"model_name={tiny_model_dir}",
            "--set",
            "max_steps=2",
            "--set",
            "max_length=64",
            "--set",
            "precision=fp32",
            "--set",
            "output_dir=out",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Trainable parameters: 3,584 (3.51%)" in printed
    assert "Trained 2 steps on" in printed
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 2


def test_errors_reach_the_user_without_a_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("lora_r: 0\ndataset_path: x.jsonl\n")
    result = run_cli("train", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith("error: config key 'lora_r' is 0, but it must be")
    assert "Traceback" not in result.stderr
    debug = run_cli("--debug", "train", str(config))
    assert "Traceback" in debug.stderr and "TunelabError" in debug.stderr


def test_missing_data_file_is_named(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name: {tiny_model_dir}\ndataset_path: nothing.jsonl\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "nothing.jsonl" in err and "does not exist" in err


def test_help_lists_every_command():
    result = run_cli("--help")
    for command in ("init", "train", "generate", "chat"):
        assert command in result.stdout
    assert "--set KEY=VALUE" in run_cli("train", "--help").stdout


@pytest.mark.parametrize("argv", [["train"], ["generate", "x"], ["bogus"]])
def test_usage_errors_exit_2(argv):
    result = run_cli(*argv)
    assert result.returncode == 2 and "usage: tunelab" in result.stderr
