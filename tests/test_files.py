"""Every file tunelab writes is whole or absent, and a full disk is a one-line error; every
reader of a run folder names the damaged file instead of failing inside a parser.

A full disk is simulated without root by making the serializer or ``os.fsync`` raise
ENOSPC part-way (fsync reports ENOSPC on real file systems too); one test mounts a real tiny
tmpfs and runs only as root (CI runs as root).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_run_config, write_jsonl

from tunelab.errors import TunelabError
from tunelab.ownership import MANIFEST


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of an interrupted write."""
    return [
        p.name
        for p in folder.rglob("*")
        if (p.name.startswith(".") and p.name != MANIFEST) or "partial" in p.name
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A finished tiny LoRA run (checkpoints every 2 steps), copied fresh for each test."""
    from tunelab.api import FineTuner

    folder = tmp_path_factory.mktemp("finished")
    rows = [{"prompt": f"What is {i}?", "completion": f"It is {i}."} for i in range(12)]
    data = write_jsonl(folder / "train.jsonl", rows)
    config = tiny_run_config(
        tiny_model_dir,
        data,
        folder / "run",
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        plot=False,
        data_cache=False,
    )
    FineTuner(config).train()
    return folder / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def cut(path: Path, keep: float = 0.5) -> None:
    """Truncate ``path`` to a share of its bytes, as a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- writers ----------------------------------------------------------------------------------


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    from tunelab.files import atomic_write_json

    target = tmp_path / "results.json"
    atomic_write_json(target, {"old": 1})
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TunelabError, match=r"not enough disk space for results.json in .*MiB free"):
        atomic_write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert leftovers(tmp_path) == []


def _write_data_report(folder: Path) -> Path:
    from tunelab.data.report import write_reports

    return write_reports({"counts": {}, "source": "x.jsonl"}, folder)[0]


def _write_compare_page(folder: Path, runs: list[Path]) -> Path:
    from tunelab.runs import compare_runs

    compare_runs([str(r) for r in runs], folder, plot=False)
    return folder / "compare.html"


def _write_curves(folder: Path) -> Path:
    from tunelab.training.reporting import plot_curves

    return plot_curves([{"step": 1, "loss": 2.0, "lr": 1e-4}], folder / "curves.png")


def _write_prepared(folder: Path) -> Path:
    from tunelab.data.prepare import PreparedData, write_prepared
    from tunelab.data.schema import Example

    prepared = PreparedData([Example("a:1", text="hello")], None, {"counts": {}})
    write_prepared(prepared, folder)
    return folder / "train.jsonl"


def _write_data_cache(folder: Path) -> Path:
    from tunelab.data.prepare import PreparedData
    from tunelab.data.schema import Example
    from tunelab.data.store import write_cache

    prepared = PreparedData([Example("a:1", text="hello")], None, {"counts": {}})
    write_cache(folder / "cache", prepared)
    return folder / "cache"


def _write_starter_config(folder: Path) -> Path:
    import argparse

    from tunelab.cli import cmd_init

    cmd_init(argparse.Namespace(path=str(folder / "starter.yaml"), force=False))
    return folder / "starter.yaml"


WRITERS = {
    "data report": _write_data_report,
    "training curves": _write_curves,
    "prepared data": _write_prepared,
    "data cache": _write_data_cache,
    "starter config": _write_starter_config,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writers_turn_a_full_disk_into_an_error_and_leave_nothing_half_written(
    name, tmp_path, monkeypatch
):
    folder = tmp_path / "out"
    folder.mkdir()
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TunelabError, match="not enough disk space"):
        WRITERS[name](folder)
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert written == [], f"{name} left {written}"


def test_runs_compare_page_on_a_full_disk(run_copy, tmp_path, monkeypatch):
    second = tmp_path / "second"
    shutil.copytree(run_copy, second)
    out = tmp_path / "compare"
    out.mkdir()
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TunelabError, match="not enough disk space for compare.html"):
        _write_compare_page(out, [run_copy, second])
    assert list(out.iterdir()) == []


def test_sweep_plots_on_a_full_disk(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    from tunelab.planning.sweep import write_plots

    study = optuna.create_study()
    for value in (1.0, 0.5):
        study.add_trial(
            optuna.trial.create_trial(
                params={"learning_rate": value / 1000},
                distributions={"learning_rate": optuna.distributions.FloatDistribution(0, 1)},
                value=value,
            )
        )
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TunelabError, match="not enough disk space for optimization_history.png"):
        write_plots(study, tmp_path / "sweep")
    assert list((tmp_path / "sweep").iterdir()) == []


def test_metrics_line_cut_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    from tunelab.run_folder import read_metrics
    from tunelab.training.logging import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 2.5})
    real_write = os.write

    def half_then_full(descriptor, data):  # the disk fills in the middle of the line
        if len(data) > 10:
            return real_write(descriptor, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(TunelabError, match="not enough disk space for a line of metrics.jsonl"):
        log.write({"step": 2, "loss": 2.4})
    monkeypatch.undo()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}]


def test_checkpoint_cut_by_a_full_disk_leaves_the_previous_one_whole(run_copy, monkeypatch):
    import torch

    import tunelab.training.checkpoint as checkpoint
    from tunelab.training.state import TrainState

    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda folder, state_dict=None: (Path(folder) / "w.bin").write_bytes(
        b"0" * 100
    )
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(TunelabError, match=r"not enough disk space for a checkpoint in .*needs"):
        checkpoint.save_checkpoint(run_copy, model, optimizer, scheduler, TrainState(step=9))
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


def tokenizer_save_that_fills_the_disk(tokenizer):
    """The tokenizer's save_pretrained writing part of tokenizer.json, then failing the way
    the tokenizers library does on a full disk (a plain Exception with the OS error text)."""
    real = tokenizer.save_pretrained

    def save(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        cut(Path(folder) / "tokenizer.json", 0.35)
        raise Exception("No space left on device (os error 28)")

    return save


def test_final_save_cut_by_a_full_disk_leaves_no_run_that_looks_finished(make_config, tmp_path):
    from tunelab.api import FineTuner
    from tunelab.generation import load_for_inference

    config = make_config(max_steps=2, plot=False)
    tuner = FineTuner(config)
    tuner.load_tokenizer()
    tuner.tokenizer.save_pretrained = tokenizer_save_that_fills_the_disk(tuner.tokenizer)
    with pytest.raises(TunelabError) as caught:
        tuner.train()
    message = str(caught.value)
    assert message.startswith("not enough disk space for the trained model (adapter, tokenizer")
    assert "needs about" in message and "MiB free" in message and "\n" not in message
    run = Path(config.output_dir)
    names = {p.name for p in run.iterdir()}
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    assert "results.json" not in names
    assert [n for n in names if n.startswith(".") and n != MANIFEST] == []
    # the readers then say what happened instead of blaming the hub or a parser
    with pytest.raises(TunelabError, match="a tunelab run that did not finish"):
        load_for_inference(str(run))
    from tunelab.diagnostics.run_report import diagnose_run

    assert "run_unfinished" in {f.code for f in diagnose_run(run)}


def test_merge_cut_by_a_full_disk_leaves_no_model_folder(run_copy, tmp_path, monkeypatch):
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from tunelab.shipping.merge import merge_run

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    out = tmp_path / "merged"
    with pytest.raises(TunelabError, match=r"not enough disk space for the merged model in"):
        merge_run(run_copy, out)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_gguf_export_cut_by_a_full_disk_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from tunelab.shipping.gguf_export import export_gguf

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(TunelabError, match="not enough disk space for the GGUF file"):
        export_gguf(tiny_model_dir, tmp_path / "model.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_is_whole_or_absent(tmp_path):
    from tunelab.files import staged_folder

    target = tmp_path / "cache" / "model"
    with pytest.raises(TunelabError, match="not enough disk space for the model cache in"):
        with staged_folder(target, "the model cache") as staging:
            (staging / "config.json").write_text("{}")
            raise Exception("No space left on device (os error 28)")
    assert not target.exists() and leftovers(tmp_path) == []
    with staged_folder(target, "the model cache") as staging:
        (staging / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"


# --- readers ----------------------------------------------------------------------------------


def test_generate_names_a_truncated_tokenizer_json(run_copy):
    from tunelab.generation import load_for_inference

    cut(run_copy / "tokenizer.json")
    with pytest.raises(TunelabError) as caught:
        load_for_inference(str(run_copy))
    message = str(caught.value)
    assert f"{run_copy / 'tokenizer.json'} is damaged (not valid JSON" in message
    assert "--resume" in message and "hub" not in message


def test_generate_names_a_truncated_adapter(run_copy):
    from tunelab.generation import load_for_inference

    cut(run_copy / "adapter_model.safetensors", 0.8)
    with pytest.raises(TunelabError, match=r"adapter_model.safetensors is damaged \(\d"):
        load_for_inference(str(run_copy))


def test_generate_names_a_missing_adapter(run_copy):
    from tunelab.generation import load_for_inference

    (run_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(TunelabError, match="adapter_model.safetensors is missing"):
        load_for_inference(str(run_copy))


def test_generate_names_a_saved_config_cut_at_a_line_boundary(run_copy):
    # still valid YAML, but its last keys are gone: the manifest's size gives it away, instead
    # of defaults silently standing in for the missing keys
    from tunelab.generation import load_for_inference
    from tunelab.runs import check_run_files

    config = run_copy / "tunelab_config.yaml"
    lines = config.read_text().splitlines(keepends=True)
    config.write_text("".join(lines[: len(lines) // 2]))
    written = json.loads((run_copy / MANIFEST).read_text())["files"]["tunelab_config.yaml"]
    with pytest.raises(TunelabError) as caught:
        load_for_inference(str(run_copy))
    message = str(caught.value)
    assert f"{config} is {config.stat().st_size} bytes but tunelab wrote {written}" in message
    assert "cut off or edited" in message and "--resume" in message
    (run_copy / MANIFEST).unlink()  # a run from before manifests: nothing to compare with
    check_run_files(run_copy)


def test_check_run_files_names_an_edited_saved_config_but_not_a_repointed_adapter(run_copy):
    from tunelab.runs import check_run_files

    adapter_config = run_copy / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = str(run_copy / "moved-base")  # the user's own edit
    adapter_config.write_text(json.dumps(settings))
    check_run_files(run_copy)
    config = run_copy / "tunelab_config.yaml"
    config.write_text(config.read_text().replace("max_steps: 4", "max_steps: 40"))
    with pytest.raises(TunelabError, match=r"tunelab_config.yaml is \d+ bytes but tunelab wrote"):
        check_run_files(run_copy)


def test_doctor_reports_damaged_files_instead_of_a_traceback(run_copy):
    from tunelab.diagnostics.run_report import diagnose_run

    cut(run_copy / "tokenizer.json")
    cut(run_copy / "results.json")
    findings = diagnose_run(run_copy)
    damaged = [f for f in findings if f.code == "damaged_file"]
    assert {f.title for f in damaged} == {
        "tokenizer.json is damaged or missing",
        "results.json is damaged or missing",
    }
    assert all(f.severity == "error" and "--resume" in f.fix for f in damaged)


def test_doctor_command_on_a_damaged_run_exits_cleanly(run_copy):
    import sys

    cut(run_copy / "tokenizer.json")
    done = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "doctor", str(run_copy)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert "tokenizer.json is damaged or missing" in done.stdout
    assert done.returncode == 1


def test_runs_list_and_compare_name_a_truncated_results_json(run_copy, tmp_path):
    from tunelab.runs import compare_runs, list_runs

    cut(run_copy / "results.json")
    # runs list skips the damaged run with a note naming the file (one must not hide the rest)
    listing = list_runs(tmp_path)
    assert f"skipped {run_copy}" in listing and "results.json is damaged (not valid JSON" in listing
    with pytest.raises(TunelabError, match=r"results.json is damaged"):
        compare_runs([str(run_copy), str(run_copy)], None)


def test_runs_list_skips_a_save_folder_left_by_a_kill(run_copy, tmp_path):
    from tunelab.runs import find_runs

    leftover = run_copy / ".final-save-x"
    leftover.mkdir()
    shutil.copy(run_copy / "tunelab_config.yaml", leftover)
    assert find_runs(tmp_path) == [run_copy]


def test_merge_names_a_truncated_adapter_config(run_copy, tmp_path):
    from tunelab.shipping.merge import merge_run

    cut(run_copy / "adapter_config.json")
    with pytest.raises(TunelabError, match=r"adapter_config.json is damaged"):
        merge_run(run_copy, tmp_path / "merged")


def test_gguf_export_names_a_truncated_weights_file(tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    from tunelab.shipping.gguf_export import export_gguf

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cut(model / "model.safetensors", 0.6)
    with pytest.raises(TunelabError, match=r"model.safetensors is damaged .*write it again"):
        export_gguf(model, tmp_path / "out.gguf", "f32")


def test_eval_names_a_truncated_tokenizer(run_copy):
    from tunelab.runs.checks import resolve_run_dir

    cut(run_copy / "tokenizer_config.json")
    with pytest.raises(TunelabError, match=r"tokenizer_config.json is damaged"):
        resolve_run_dir(run_copy)


@pytest.mark.parametrize("name", ["trainer_state.json", "training_state.pt"])
def test_resume_names_a_damaged_checkpoint_file(name, run_copy):
    from tunelab.api import FineTuner
    from tunelab.config import load_config

    config = load_config(
        run_copy / "tunelab_config.yaml", [f"output_dir={run_copy}", "max_steps=6"]
    )
    latest = sorted((run_copy / "checkpoints").iterdir())[-1]
    cut(latest / name)
    with pytest.raises(TunelabError) as caught:
        FineTuner(config).train(resume=True)
    message = str(caught.value)
    assert str(latest / name) in message and f"Delete the folder {latest}" in message


def test_resume_over_a_torn_last_metrics_line(run_copy):
    from tunelab.api import FineTuner
    from tunelab.config import load_config
    from tunelab.run_folder import read_metrics

    config = load_config(
        run_copy / "tunelab_config.yaml", [f"output_dir={run_copy}", "max_steps=5"]
    )
    with (run_copy / "metrics.jsonl").open("a") as file:
        file.write('{"step": 5, "lo')  # a crash in the middle of a line
    FineTuner(config).train(resume=True)
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3, 4, 5]


# --- a real full disk -------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_real_full_disk_during_the_final_save(make_config, tmp_path, monkeypatch):
    import tunelab.api
    from tunelab.api import FineTuner

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        config = make_config(max_steps=1, plot=False)
        tuner = FineTuner(config)
        results = tuner.train()
        saved = sum(p.stat().st_size for p in Path(config.output_dir).iterdir() if p.is_file())
        # leave less room than the save needs; the space check is taken out so that the
        # real ENOSPC from the real serializers is met half-way
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"0" * max(0, free - saved // 2))
        with pytest.raises(TunelabError, match="not enough disk space for the trained model"):
            tuner.save_model(disk / "run", results=results)
        with pytest.raises(TunelabError, match=r"needs about \d+ MiB"):
            monkeypatch.setattr(tunelab.api, "ensure_free_space", lambda *a: None)
            tuner.save_model(disk / "run", results=results)
        assert [p.name for p in (disk / "run").iterdir() if p.name != MANIFEST] == []
    finally:
        subprocess.run(["umount", str(disk)])
