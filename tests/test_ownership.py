"""tunelab deletes or replaces only what it wrote; outputs never are or contain inputs (#17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.api import FineTuner
from tunelab.cli import main
from tunelab.errors import TunelabError

MANIFEST = ".tunelab-manifest.json"


def read_manifest(folder: Path) -> dict:
    """The folder's manifest as written (read directly: the test must not trust the reader)."""
    return json.loads((folder / MANIFEST).read_text())


def _user_project(folder: Path) -> Path:
    """A user's project folder that merely holds names tunelab also uses."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "src").mkdir()
    (folder / "src" / "train.py").write_text("x\n")
    return folder


def test_overwrite_refuses_a_folder_holding_only_a_checkpoints_folder(make_config, tmp_path):
    project = _user_project(tmp_path / "proj")
    with pytest.raises(TunelabError, match=r"tunelab did not write \(src/train.py\)"):
        FineTuner(make_config(output_dir=str(project))).train(overwrite=True)
    assert (project / "src" / "train.py").read_text() == "x\n"


def test_overwrite_refuses_a_folder_holding_a_stray_tunelab_config(make_config, tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "tunelab_config.yaml").write_text("learning_rate: 1.0e-4\n")
    (project / "notes.md").write_text("mine\n")
    with pytest.raises(TunelabError, match=r"did not write \(.*notes.md"):
        FineTuner(make_config(output_dir=str(project))).train(overwrite=True)
    assert (project / "notes.md").read_text() == "mine\n"
    assert (project / "tunelab_config.yaml").read_text() == "learning_rate: 1.0e-4\n"


def test_a_run_records_its_files_and_overwrite_keeps_a_file_the_user_added(make_config, tmp_path):
    FineTuner(make_config(max_steps=1)).train()
    run = tmp_path / "run"
    manifest = read_manifest(run)
    assert manifest is not None and manifest["kind"] == "run" and manifest["complete"]
    assert {"adapter_model.safetensors", "tunelab_config.yaml", "metrics.jsonl"} <= set(
        manifest["files"]
    )
    assert manifest["files"]["results.json"] == (run / "results.json").stat().st_size
    (run / "my-notes.txt").write_text("keep me\n")
    with pytest.raises(TunelabError, match=r"did not write \(my-notes.txt\)"):
        FineTuner(make_config(max_steps=2)).train(overwrite=True)
    assert (run / "my-notes.txt").read_text() == "keep me\n"
    (run / "my-notes.txt").unlink()
    FineTuner(make_config(max_steps=2)).train(overwrite=True)
    assert json.loads((run / "results.json").read_text())["steps"] == 2


def test_resume_refuses_a_folder_that_is_not_a_run(make_config, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"mine": true}')
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(TunelabError, match="is not a tunelab run"):
        FineTuner(make_config(output_dir=str(folder))).train(resume=True)
    assert (folder / "tokenizer.json").read_text() == '{"mine": true}'
    assert (folder / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_resumed_run_leaves_the_users_file_out_of_its_manifest(make_config, tmp_path):
    config = make_config(max_steps=4, save_steps=2)
    FineTuner(config).train()
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine\n")
    FineTuner(make_config(max_steps=6, save_steps=2)).train(resume=True)
    assert "notes.txt" not in read_manifest(run)["files"]
    assert (run / "notes.txt").read_text() == "mine\n"


def test_output_dir_inside_the_data_folder_or_holding_the_data_is_refused(make_config, tmp_path):
    config = make_config()
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "train.jsonl").write_text(Path(config.dataset_path).read_text())
    inside = make_config(dataset_path=str(data_folder), output_dir=str(data_folder / "run"))
    with pytest.raises(TunelabError, match="lies inside the input dataset_path"):
        FineTuner(inside).train()
    assert not (data_folder / "run").exists()
    # the data file lives in the folder given as output_dir
    (data_folder / "tunelab_config.yaml").write_text("method: lora\n")
    holding = make_config(
        dataset_path=str(data_folder / "train.jsonl"), output_dir=str(data_folder)
    )
    with pytest.raises(TunelabError, match="contains the input dataset_path"):
        FineTuner(holding).train(overwrite=True)
    assert (data_folder / "train.jsonl").is_file()


def test_output_dir_cannot_be_the_base_model_folder(make_config, tiny_model_dir):
    config = make_config(output_dir=str(tiny_model_dir))
    with pytest.raises(TunelabError, match="is the input model_name"):
        FineTuner(config).train(overwrite=True)
    assert (tiny_model_dir / "config.json").is_file()


@pytest.fixture
def trained_run(make_config, tmp_path) -> Path:
    FineTuner(make_config(max_steps=1)).train()
    return tmp_path / "run"


def test_merge_never_deletes_a_users_folder_or_its_own_run(trained_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_text("x")
    assert main(["merge", str(trained_run), str(folder), "--overwrite"]) == 2
    assert "tunelab did not write (cat.jpg)" in capsys.readouterr().err
    assert (folder / "cat.jpg").exists()
    assert main(["merge", str(trained_run), str(trained_run), "--overwrite"]) == 2
    assert "is the input run_dir" in capsys.readouterr().err
    assert (trained_run / "adapter_model.safetensors").is_file()
    assert main(["merge", str(trained_run), str(trained_run.parent), "--overwrite"]) == 2
    assert "contains the input run_dir" in capsys.readouterr().err
    assert (trained_run / "adapter_model.safetensors").is_file()


def test_merge_overwrite_replaces_its_own_merge_only(trained_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", str(trained_run), str(merged)]) == 0
    assert read_manifest(merged)["kind"] == "merge"
    assert main(["merge", str(trained_run), str(merged)]) == 2
    assert "Pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(trained_run), str(merged), "--overwrite"]) == 0
    (merged / "keep.txt").write_text("mine")
    assert main(["merge", str(trained_run), str(merged), "--overwrite"]) == 2
    assert "did not write (keep.txt)" in capsys.readouterr().err
    assert (merged / "config.json").is_file()


def test_export_refuses_to_replace_a_file_unless_told_and_never_a_non_gguf(
    trained_run, tmp_path, capsys
):
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes, not a model")
    assert main(["export", str(trained_run), "--out", str(notes), "--overwrite"]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert notes.read_text() == "my notes, not a model"
    out = tmp_path / "model.gguf"
    assert main(["export", str(trained_run), "--out", str(out), "--type", "f32"]) == 0
    capsys.readouterr()
    assert main(["export", str(trained_run), "--out", str(out), "--type", "f32"]) == 2
    assert "already exists (a GGUF file). Pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--out", str(out), "--overwrite"]) == 0
    assert "Replacing the GGUF file" in capsys.readouterr().out


def test_data_prepare_never_overwrites_the_raw_data(make_config, tmp_path, capsys):
    raw_folder = tmp_path / "raw"
    raw_folder.mkdir()
    config = make_config()
    raw = raw_folder / "train.jsonl"
    raw.write_text(Path(config.dataset_path).read_text())
    before = raw.read_text()
    values = {"model_name": config.model_name, "dataset_path": str(raw)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    for flags in ([], ["--overwrite"]):
        assert main(["data", "prepare", str(tmp_path / "c.yaml"), "--out", str(raw_folder)]
                    + flags) == 2  # fmt: skip
        assert "contains the input dataset_path" in capsys.readouterr().err
    assert raw.read_text() == before


def test_data_prepare_replaces_its_own_output_only_when_told(make_config, tmp_path, capsys):
    config = make_config()
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"model_name": config.model_name, "dataset_path": config.dataset_path})
    )
    out = tmp_path / "prepared"
    command = ["data", "prepare", str(tmp_path / "c.yaml"), "--out", str(out)]
    assert main(command) == 0
    assert set(read_manifest(out)["files"]) == {"train.jsonl", "manifest.json"}
    assert main(command) == 2
    assert "Pass --overwrite" in capsys.readouterr().err
    assert main([*command, "--overwrite"]) == 0


def test_report_writers_never_replace_a_users_file(make_config, tmp_path, capsys):
    config = make_config()
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "report.md").write_text("my report\n")
    assert main(["data", "inspect", config.dataset_path, "--out", str(reports)]) == 2
    assert "already holds report.md, which tunelab did not write" in capsys.readouterr().err
    assert (reports / "report.md").read_text() == "my report\n"
    fresh = tmp_path / "fresh-reports"
    assert main(["data", "inspect", config.dataset_path, "--out", str(fresh)]) == 0
    assert main(["data", "inspect", config.dataset_path, "--out", str(fresh)]) == 0
    assert "written by tunelab earlier" in capsys.readouterr().out
    # runs compare
    runs = []
    for name in ("a", "b"):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "tunelab_config.yaml").write_text(f"learning_rate: {len(name)}\n")
        runs.append(str(folder))
    (reports / "compare.html").write_text("<p>mine</p>")
    assert main(["runs", "compare", *runs, "--out", str(reports), "--no-plot"]) == 2
    assert "compare.html, which tunelab did not write" in capsys.readouterr().err
    assert (reports / "compare.html").read_text() == "<p>mine</p>"


def test_eval_report_never_replaces_a_users_file(trained_run, tmp_path, capsys):
    from tunelab.evaluation.report import write_reports

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "eval_results.json").write_text("{}")
    with pytest.raises(TunelabError, match="eval_results.json, which tunelab did not write"):
        write_reports(object(), folder)
    assert (folder / "eval_results.json").read_text() == "{}"


def test_the_model_cache_keeps_a_users_file(trained_run, tmp_path, monkeypatch):
    from tunelab import models

    gguf_file = tmp_path / "tiny.gguf"
    assert main(["export", str(trained_run), "--out", str(gguf_file), "--type", "f32"]) == 0
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / models._gguf_cache_name(gguf_file)
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("x")  # an incomplete cache folder holding a user's file
    with pytest.raises(TunelabError, match=r"did not write \(mine.txt\)"):
        models.convert_gguf(gguf_file)
    assert (target / "mine.txt").read_text() == "x"
    (target / "mine.txt").unlink()
    (target / "config.json").write_text("{}")  # a conversion's own leftover is replaced
    assert (models.convert_gguf(gguf_file) / "model.safetensors").is_file()
    assert read_manifest(target)["kind"] == "model-cache"


def test_the_manifest_itself_is_never_listed(trained_run):
    assert MANIFEST not in read_manifest(trained_run)["files"]


def test_init_refuses_a_folder_and_says_what_force_replaces(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    assert main(["init", str(folder), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err
    existing = tmp_path / "mine.yaml"
    existing.write_text("learning_rate: 1.0e-4\n")
    assert main(["init", str(existing)]) == 2
    assert existing.read_text() == "learning_rate: 1.0e-4\n"
    assert main(["init", str(existing), "--force"]) == 0
    assert f"Replacing {existing} (--force)." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset_path": "missing.jsonl"}, "dataset_path .*missing.jsonl does not exist"),
        ({"dataset_path": "bad.jsonl"}, r"bad.jsonl:1: not valid JSON"),
        ({"target_modules": ["self_attn"]}, "'target_modules' holds 'self_attn'"),
        ({"model_name": "/nonexist"}, "model '/nonexist' is not a local folder"),
    ],
    ids=["missing-dataset", "bad-json", "bad-target-modules", "missing-model"],
)
def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused_at_start(
    trained_run, make_config, tmp_path, capsys, overrides, message
):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": \n')
    before = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    capsys.readouterr()
    paths = {k: str(tmp_path / v) for k, v in overrides.items() if str(v).endswith(".jsonl")}
    config = make_config(**{**overrides, **paths})
    with pytest.raises(TunelabError, match=message):
        FineTuner(config).train(overwrite=True)
    assert "Replacing" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()} == before
    assert (trained_run / "adapter_model.safetensors").is_file()
    assert (trained_run / "results.json").is_file()


def test_merge_overwrite_keeps_the_old_merge_when_the_base_fails_to_load(
    trained_run, tmp_path, capsys
):
    merged = tmp_path / "merged"
    assert main(["merge", str(trained_run), str(merged)]) == 0
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    adapter_config = trained_run / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**settings, "base_model_name_or_path": "/nonexist"}))
    from tunelab.ownership import record_files

    record_files(trained_run, "run", [adapter_config])  # as if tunelab wrote it: not "edited"
    capsys.readouterr()
    assert main(["merge", str(trained_run), str(merged), "--overwrite"]) == 2
    captured = capsys.readouterr()
    assert "could not load model '/nonexist'" in captured.err
    assert "Replacing" not in captured.out
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before


def _project_with_run_names(folder: Path) -> Path:
    """A user's project holding files that merely bear names a run writes."""
    folder.mkdir()
    (folder / "README.md").write_text("# My readme\n")
    (folder / "tunelab_config.yaml").write_text("x\n")
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "config.json").write_text("{}\n")
    (folder / "results.json").write_text("{}\n")
    return folder


def test_overwrite_never_takes_a_project_for_an_old_run(make_config, tmp_path):
    from tunelab.ownership import folder_kind

    project = _project_with_run_names(tmp_path / "proj")
    before = {p.name: p.read_text() for p in project.iterdir()}
    assert folder_kind(project) is None  # the names alone do not make an old run
    with pytest.raises(TunelabError, match=r"did not write \(.*README.md"):
        FineTuner(make_config(output_dir=str(project))).train(overwrite=True)
    assert {p.name: p.read_text() for p in project.iterdir()} == before


def test_an_old_runs_readme_is_never_tunelabs(tmp_path):
    from tunelab.ownership import folder_kind, prepare_output_folder, split_owned

    run = tmp_path / "old-run"  # written before manifests: the names and contents tunelab writes
    run.mkdir()
    (run / "tunelab_config.yaml").write_text(yaml.safe_dump({"model_name": "m", "max_steps": 2}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "results.json").write_text("{}\n")
    (run / "README.md").write_text("# notes on this run\n")
    assert folder_kind(run) == "run"
    owned, other = split_owned(run, "run")
    assert other == ["README.md"] and "README.md" not in owned
    with pytest.raises(TunelabError, match=r"did not write \(README.md\)"):
        prepare_output_folder(run, "run", True, "output_dir")
    assert (run / "README.md").read_text() == "# notes on this run\n"
    assert (run / "results.json").is_file()


def test_overwrite_refuses_a_file_edited_since_tunelab_wrote_it(tmp_path, capsys):
    from tunelab.ownership import (
        check_output_files,
        finish_output_folder,
        prepare_output_folder,
        split_owned,
    )

    run = tmp_path / "run"
    run.mkdir()
    (run / "tunelab_config.yaml").write_text("model_name: m\n")
    (run / "results.json").write_text("{}\n")
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    finish_output_folder(run / "data", "data")
    finish_output_folder(run, "run")
    (run / "tunelab_config.yaml").write_text("model_name: m\nlearning_rate: 0.5\n")  # the user's
    (run / "data" / "train.jsonl").write_text('{"text": "mine"}\n')
    owned, other = split_owned(run, "run")
    assert other == ["data/train.jsonl", "tunelab_config.yaml"]
    assert "results.json" in owned
    with pytest.raises(TunelabError, match=r"did not write \(data/train.jsonl, tunelab_config"):
        prepare_output_folder(run, "run", True, "output_dir")
    assert (run / "tunelab_config.yaml").read_text().endswith("learning_rate: 0.5\n")
    assert (run / "data" / "train.jsonl").read_text() == '{"text": "mine"}\n'
    with pytest.raises(TunelabError, match="tunelab_config.yaml, which tunelab did not write"):
        check_output_files(run, ["tunelab_config.yaml"], "report")
    check_output_files(run, ["results.json"], "report")  # unchanged: still tunelab's


def test_two_processes_convert_the_same_model_once(trained_run, tmp_path):
    """Under torchrun every process resolves the same GGUF model at once: one converts, the
    others wait and load its folder (a second conversion would replace the folder the first
    process is loading from)."""
    import os
    import subprocess
    import sys

    gguf_file = tmp_path / "tiny.gguf"
    assert main(["export", str(trained_run), "--out", str(gguf_file), "--type", "f32"]) == 0
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.getcwd()}
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from tunelab.models import resolve_model; print('AT', resolve_model(sys.argv[1]))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(gguf_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert sum(output.count("Converting tiny.gguf") for output in outputs) == 1, outputs
    folders = {line for output in outputs for line in output.splitlines() if line.startswith("AT")}
    assert len(folders) == 1
    assert (Path(folders.pop()[3:]) / "model.safetensors").is_file()
