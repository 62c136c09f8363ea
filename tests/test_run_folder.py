"""tunelab.run_folder: one reader per run-folder file, the same answer from every command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.errors import TunelabError

RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-4},
    {"step": 2, "loss": 2.25, "lr": 1e-4},
    {"step": 2, "eval_loss": 2.4},
]


def make_run(folder: Path, metrics_text: str) -> Path:
    folder.mkdir(parents=True)
    config = {"model_name": "tiny", "method": "lora", "learning_rate": 1e-4}
    (folder / "tunelab_config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text(metrics_text)
    (folder / "results.json").write_text(json.dumps({"steps": 2, "eval_loss": 2.4}))
    return folder


def every_reader(folder: Path) -> dict[str, list[tuple[float, float]]]:
    """The train curve as each command that reads metrics.jsonl sees it."""
    from tunelab.diagnostics.run_report import read_run_metrics
    from tunelab.evaluation.run import _training_info
    from tunelab.runs import load_run

    return {
        "runs compare / ui": [(r["step"], r["loss"]) for r in load_run(folder).train],
        "doctor": [(r["step"], r["loss"]) for r in read_run_metrics(folder)[0]],
        "eval report": [tuple(p) for p in _training_info(folder)["train_curve"]],
    }


def lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_a_torn_last_line_is_skipped_with_a_warning_by_every_reader(tmp_path, capsys):
    # a crash while the last line was written: the curve before it still stands
    folder = make_run(tmp_path / "run", lines(RECORDS) + '{"step": 3, "lo')
    seen = every_reader(folder)
    expected = [(1, 2.5), (2, 2.25)]
    assert seen == {name: expected for name in seen}
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == len(seen)
    assert all(
        w.startswith(f"warning: {folder / 'metrics.jsonl'}:4 is cut off") for w in warnings
    ), warnings


def test_a_bad_line_in_the_middle_names_file_and_line_in_every_reader(tmp_path):
    text = lines(RECORDS[:1]) + '{"step": 2, "loss"\n' + lines(RECORDS[1:])
    folder = make_run(tmp_path / "run", text)
    from tunelab.diagnostics.run_report import read_run_metrics
    from tunelab.evaluation.run import _training_info
    from tunelab.run_folder import read_metrics
    from tunelab.runs import load_run

    for reader in (load_run, read_run_metrics, _training_info, read_metrics):
        with pytest.raises(TunelabError, match=r"metrics.jsonl:2 is not valid JSON") as caught:
            reader(folder)
        assert str(folder / "metrics.jsonl") in str(caught.value)


def test_a_line_that_is_json_but_not_an_object_is_refused(tmp_path):
    from tunelab.run_folder import read_metrics

    folder = make_run(tmp_path / "run", lines(RECORDS[:1]) + "[1, 2]\n" + lines(RECORDS[1:]))
    with pytest.raises(TunelabError, match=r"metrics.jsonl:2 is not a JSON object"):
        read_metrics(folder)


def test_resume_drops_a_torn_line_through_the_same_reader(tmp_path, capsys):
    from tunelab.run_folder import read_metrics
    from tunelab.training.logging import MetricsLog

    folder = make_run(tmp_path / "run", lines(RECORDS) + '{"step": 3, "lo')
    MetricsLog(folder / "metrics.jsonl", resume_step=1)
    assert "metrics.jsonl:4 is cut off" in capsys.readouterr().err
    assert read_metrics(folder) == RECORDS[:1]


def test_check_run_files_reads_the_saved_config_as_every_command_does(tmp_path):
    from tunelab.run_folder import read_saved_config
    from tunelab.runs import check_run_files

    folder = make_run(tmp_path / "run", lines(RECORDS))
    (folder / "tunelab_config.yaml").write_text("- lora\n- 1e-4\n")  # YAML, not a mapping
    for reader in (read_saved_config, check_run_files):
        with pytest.raises(TunelabError, match=r"tunelab_config.yaml: expected 'key: value'"):
            reader(folder)


def test_results_that_are_not_an_object_are_named(tmp_path):
    from tunelab.run_folder import read_results

    folder = make_run(tmp_path / "run", lines(RECORDS))
    assert read_results(folder) == {"steps": 2, "eval_loss": 2.4}
    (folder / "results.json").write_text("[1]")
    with pytest.raises(TunelabError, match=r"results.json is damaged \(not a JSON object\)"):
        read_results(folder)
    (folder / "results.json").unlink()
    assert read_results(folder) is None


def test_plots_leave_the_matplotlib_backend_as_the_user_set_it(tmp_path):
    # a notebook user's inline backend must survive a training run's plot
    import matplotlib

    from tunelab.runs import load_run, plot_png
    from tunelab.training.reporting import plot_curves

    before = matplotlib.get_backend()
    try:
        matplotlib.use("pdf")
        folder = make_run(tmp_path / "run", lines(RECORDS))
        assert plot_curves(RECORDS, tmp_path / "curves.png") == tmp_path / "curves.png"
        plot_png([load_run(folder), load_run(folder)], tmp_path / "compare.png")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    for name in ("curves.png", "compare.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_a_command_whose_module_fails_to_import_stays_listed_and_names_the_fix(
    monkeypatch, capsys, tmp_path
):
    from tunelab.cli import main, missing_package_hint

    monkeypatch.setitem(sys.modules, "tunelab.runs.cli", None)  # as if its import failed
    assert main(["runs", "list", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'tunelab runs' is unavailable: importing tunelab.runs.cli failed" in err, err
    assert "Reinstall tunelab" in err
    missing = ModuleNotFoundError("No module named 'optuna'", name="optuna")
    assert missing_package_hint(missing).endswith("pip install 'tunelab[sweep]'")
    missing = ModuleNotFoundError("No module named 'somepkg'", name="somepkg.sub")
    assert missing_package_hint(missing).endswith("pip install somepkg")


def test_library_notes_go_through_logging_and_can_be_silenced(tmp_path, capsys):
    # a notebook or program embedding tunelab decides where its notes go
    from tunelab.ownership import prepare_output_folder, record_files

    folder = tmp_path / "out"
    prepare_output_folder(folder, "data", False, "--out")
    (folder / "train.jsonl").write_text("{}\n")
    record_files(folder, "data", [folder / "train.jsonl"])
    prepare_output_folder(folder, "data", True, "--out")
    assert capsys.readouterr().out == f"Replacing 1 file(s) tunelab wrote in {folder}.\n"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tunelab_logger = logging.getLogger("tunelab")
    tunelab_logger.addHandler(handler)
    tunelab_logger.setLevel(logging.WARNING)  # the user's choice: warnings only
    try:
        (folder / "train.jsonl").write_text("{}\n")
        record_files(folder, "data", [folder / "train.jsonl"])
        prepare_output_folder(folder, "data", True, "--out")
        tunelab_logger.setLevel(logging.INFO)
        (folder / "train.jsonl").write_text("{}\n")
        record_files(folder, "data", [folder / "train.jsonl"])
        prepare_output_folder(folder, "data", True, "--out")
    finally:
        tunelab_logger.removeHandler(handler)
        tunelab_logger.setLevel(logging.INFO)
    assert [r.name for r in records] == ["tunelab.ownership"]
    assert records[0].getMessage() == f"Replacing 1 file(s) tunelab wrote in {folder}."
