"""The run folder's files as a user may leave them: values of the wrong kind, NaN, a damaged
results.json in doctor, and the install hint for a missing package."""

import json
import math

import pytest
import yaml

from tunelab.cli import main, missing_package_hint
from tunelab.diagnostics.run_report import diagnose_run
from tunelab.errors import TunelabError
from tunelab.files import atomic_write_json
from tunelab.run_folder import read_metrics, read_results


def strict(text):
    """json.loads refusing NaN/Infinity, as strict JSON readers (JavaScript, jq) do."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run_folder(folder, results=None, lines=None):
    folder.mkdir(parents=True, exist_ok=True)
    records = lines or [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3} for s in range(1, 5)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "results.json").write_text(json.dumps(results or {"steps": 4, "eval_loss": 2.5}))
    (folder / "tunelab_config.yaml").write_text(yaml.safe_dump({"method": "lora", "max_steps": 4}))
    return folder


def test_run_files_are_written_as_strict_json_with_null_for_nan(tmp_path):
    from tunelab.training.logging import MetricsLog

    path = atomic_write_json(
        tmp_path / "results.json", {"final_train_loss": math.nan, "n": [math.inf]}
    )
    assert strict(path.read_text()) == {"final_train_loss": None, "n": [None]}
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": math.nan})
    assert strict((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None}


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ({"steps": "eight"}, "'steps' expected a whole number, found 'eight'"),
        ({"steps": 4, "eval_loss": "low"}, "'eval_loss' expected a number, found 'low'"),
        ({"steps": -1}, "'steps' expected a number of 0 or more, found -1"),
        ({"steps": 4, "method": 3}, "'method' expected text, found 3"),
    ],
)
def test_results_values_of_the_wrong_kind_are_refused_by_name(tmp_path, capsys, results, expected):
    run = run_folder(tmp_path / "run", results=results)
    with pytest.raises(TunelabError, match=expected) as error:
        read_results(run)
    assert str(run / "results.json") in str(error.value) and "--overwrite" in str(error.value)
    other = run_folder(tmp_path / "other")
    assert main(["runs", "compare", str(run), str(other)]) == 2
    assert expected in capsys.readouterr().err


def test_metrics_lines_of_the_wrong_kind_are_refused_by_line(tmp_path, capsys):
    lines = [{"step": 1, "loss": 3.0}, {"step": "x", "loss": "y"}, {"step": 3, "loss": 2.0}]
    run = run_folder(tmp_path / "run", lines=lines)
    with pytest.raises(TunelabError) as error:
        read_metrics(run)
    message = str(error.value)
    assert f"{run / 'metrics.jsonl'}:2: 'step' expected a whole number, found 'x'" in message
    assert "delete that line" in message and "--overwrite" in message
    assert main(["runs", "compare", str(run), str(run_folder(tmp_path / "other"))]) == 2
    assert "metrics.jsonl:2: 'step' expected a whole number" in capsys.readouterr().err


def test_doctor_reports_damaged_lines_and_results_as_findings(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": "y"}, {"step": 3, "loss": 2.0}]
    run = run_folder(tmp_path / "run", lines=lines)
    with (run / "metrics.jsonl").open("a") as file:
        file.write('{"step": 4, "loss"\n{"step": 5, "loss": 1.0}\n')
    (run / "results.json").write_text('{"steps": 5, "eval_lo')  # cut off
    findings = diagnose_run(run)
    codes = [f.code for f in findings]
    assert "run_unfinished" not in codes  # results.json is there, only damaged
    damaged = [f for f in findings if f.code == "damaged_file"]
    assert any("metrics.jsonl has 2 damaged line(s)" in f.title for f in damaged), damaged
    lines_finding = next(f for f in damaged if "metrics.jsonl" in f.title)
    assert "metrics.jsonl:2: 'loss' expected a number" in lines_finding.evidence
    assert "metrics.jsonl:4 is not valid JSON" in lines_finding.evidence
    results_finding = next(f for f in damaged if "results.json" in f.title)
    assert "tunelab doctor" not in results_finding.fix  # not "run doctor" from doctor
    # a value of the wrong kind in results.json is a finding too
    (run / "results.json").write_text(json.dumps({"steps": "five"}))
    findings = diagnose_run(run)
    assert "run_unfinished" not in [f.code for f in findings]
    assert any("'steps' expected a whole number" in f.evidence for f in findings)


def test_a_missing_core_dependency_is_not_sent_to_an_extra():
    requirements = ["jinja2>=3.1", 'jinja2>=3.1; extra == "ui"', 'optuna>=3; extra == "sweep"']
    missing = ModuleNotFoundError("No module named 'jinja2'", name="jinja2")
    hint = missing_package_hint(missing, requirements)
    assert "tunelab[ui]" not in hint
    assert "core dependency of tunelab" in hint
    assert "pip install --force-reinstall tunelab" in hint and "pip install 'jinja2>=3.1'" in hint
    missing = ModuleNotFoundError("No module named 'optuna'", name="optuna")
    assert missing_package_hint(missing, requirements).endswith("pip install 'tunelab[sweep]'")
