"""Runs survive crashes: killed at random moments and resumed, they end where an uninterrupted
run ends, bit for bit (fp32 on CPU, fixed seed)."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file


def start(config_path, *flags, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "tunelab.cli", "train", str(config_path), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.fixture
def run_config(make_config, tmp_path):
    def write(name, **overrides):
        values = dict(max_steps=40, save_steps=1, lora_dropout=0.1, output_dir=str(tmp_path / name))
        values.update(overrides)
        config = make_config(**values)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        return path

    return write


def steps_done(run_dir, by_checkpoint):
    """How far a run being written got: its newest checkpoint's step, or the highest step in
    its metrics.jsonl (0 when there is none yet)."""
    if by_checkpoint:
        found = (run_dir / "checkpoints").glob("step-*")
        return max((int(p.name.removeprefix("step-")) for p in found), default=0)
    metrics = run_dir / "metrics.jsonl"
    steps = [0]
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass  # the line being written
    return max(steps)


def kill_when(process, reached, deadline):
    """SIGKILL ``process`` as soon as ``reached()`` is true; fails if it ends first."""
    while not reached():
        assert process.poll() is None, "the run ended before its kill point:\n" + (
            process.stdout.read()
        )
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(run_config, tmp_path):
    whole = start(run_config("whole"))
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    path = run_config("killed")
    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    # kill points are steps, not seconds, so a slow machine cannot finish the run first: each
    # round waits for metrics line N (the kill then lands during or before checkpoint N's
    # write) or for checkpoint N itself, N rising by 3-10 steps: at most 30 of 40, and above
    # any line the previous round left past its checkpoint
    kill_step = 0
    for _ in range(3):
        kill_step += rng.randint(3, 10)
        flags = ["--resume"] if run_dir.exists() else []
        process = start(path, *flags)
        by_checkpoint = rng.random() < 0.5
        kill_when(
            process,
            lambda: steps_done(run_dir, by_checkpoint) >= kill_step,  # noqa: B023 (called now)
            time.monotonic() + 300,
        )
    flags = ["--resume"] if (tmp_path / "killed").exists() else []
    final = start(path, *flags)
    output = final.communicate(timeout=300)[0]
    assert final.returncode == 0, output
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # no half-written checkpoint was ever taken for a whole one
    names = sorted(
        p.name
        for p in (tmp_path / "killed" / "checkpoints").iterdir()
        if not p.name.startswith(".")
    )
    assert all(n.startswith("step-") for n in names)


def test_resume_with_a_changed_config_is_refused(run_config, tmp_path):
    path = run_config("run", max_steps=2)
    assert start(path).wait(timeout=300) == 0
    changed = run_config("run", max_steps=4, lora_r=16)
    process = start(changed, "--resume")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 2
    assert "cannot resume" in output and "lora_r" in output and "8" in output and "16" in output
    assert "Traceback" not in output


def test_no_user_string_reaches_a_shell():
    import pathlib

    package = pathlib.Path(__file__).resolve().parents[1] / "tunelab"
    for source in package.rglob("*.py"):
        text = source.read_text()
        assert "shell=True" not in text, source
        assert "os.system(" not in text and "os.popen(" not in text, source


def test_pickled_files_load_only_as_weights():
    import pathlib

    package = pathlib.Path(__file__).resolve().parents[1] / "tunelab"
    for source in package.rglob("*.py"):
        text = source.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (source, line)
        assert "pickle.load" not in text, source


def test_a_full_disk_is_refused_before_writing(make_config, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from tunelab.api import FineTuner
    from tunelab.errors import TunelabError
    from tunelab.files import ensure_free_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        TunelabError,
        match=r"not enough disk space for the weights in .* needs "
        r"about 1 MiB, 0 MiB free. Free some space",
    ):
        ensure_free_space(tmp_path, 2**20, "the weights")
    with pytest.raises(TunelabError, match="not enough disk space"):
        FineTuner(make_config(max_steps=2)).train()
