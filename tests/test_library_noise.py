"""Library chatter stays out of tunelab's output and comes back with --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOISE = (
    "gemm_4bit_forward",  # bitsandbytes' kernels note (CPUs with AVX-512 bf16)
    "FutureWarning",
    "DeprecationWarning",
)


def train(config_path: Path, *flags: str, debug: bool = False) -> str:
    done = subprocess.run(
        # -W default: show every warning Python would hide by default, so nothing is hidden
        # by accident of the test's interpreter settings
        [sys.executable, "-W", "default", "-m", "tunelab.cli"]
        + (["--debug"] if debug else [])
        + ["train", str(config_path), *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def has_avx512_bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16  # what bitsandbytes checks first
    except ImportError:
        return False
    return bool(has_avx512bf16())


def test_train_output_has_no_library_noise_and_debug_shows_it(make_config, tmp_path):
    # importing peft imports bitsandbytes (its kernels note); full fine-tuning meets
    # transformers' deprecation of is_gradient_checkpointing
    config = make_config(method="full", max_steps=2, plot=False, learning_rate=1e-5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    quiet = train(path)
    for text in NOISE:
        assert text not in quiet, quiet
    assert "Trained 2 steps" in quiet
    loud = train(path, "--overwrite", debug=True)
    assert "DeprecationWarning" in loud or "FutureWarning" in loud
    if has_avx512_bf16():
        assert "Failed to load CPU gemm_4bit_forward from kernels-community" in loud


def test_tunelab_warnings_are_not_silenced(monkeypatch):
    import logging
    import warnings

    from tunelab.library_noise import QUIET_LOGGERS, silence_library_noise

    for name in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    for name in QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_library_noise()
        warnings.warn_explicit("ours", FutureWarning, "tunelab/x.py", 1, module="tunelab.x")
        warnings.warn_explicit("theirs", FutureWarning, "t.py", 1, module="transformers.x")
    assert [str(w.message) for w in caught] == ["ours"]
