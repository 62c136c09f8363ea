"""tunelab sweep: spec checks, a resumable SQLite study, two workers on one storage, pruning
on reported eval losses, and the best config ready for tunelab train."""

from __future__ import annotations

import subprocess
import sys
import sys as _sys

import pytest
import yaml

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.planning.sweep import load_sweep, parse_spec, run_sweep

optuna = pytest.importorskip("optuna")

SPACE = {
    "trials": 4,
    "sampler": "random",
    "pruner": "none",  # pruning has its own test; here every trial runs to the end
    "params": {
        "learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "lora_r": {"choices": [2, 4]},
    },
}


def _write(tmp_path, make_config, sweep=SPACE, **overrides):
    config = make_config(**({"eval_split": 0.25, "eval_steps": 2, "max_steps": 4} | overrides))
    values = config.to_dict()
    values["output_dir"] = str(tmp_path / "sweep")
    values["sweep"] = sweep
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _worker(path, trials):
    code = (
        "import sys; from tunelab.cli import main; "
        f"sys.exit(main(['sweep', {str(path)!r}, '--trials', '{trials}']))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_workers_share_one_sqlite_study_and_write_the_best_config(tmp_path, make_config):
    path = _write(tmp_path, make_config)
    workers = [_worker(path, 2), _worker(path, 2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    out = tmp_path / "sweep"
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    trials = study.trials
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    for t in trials:
        run = out / f"trial-{t.number:03d}"
        assert (run / "adapter_model.safetensors").is_file()
        assert t.params["lora_r"] in (2, 4) and 1e-4 <= t.params["learning_rate"] <= 1e-2
        # every evaluation during training was reported (eval_steps 2 of 4 steps)
        assert sorted(t.intermediate_values) == [2, 4]
        final = yaml.safe_load((run / "tunelab_config.yaml").read_text())
        assert final["lora_r"] == t.params["lora_r"]
    best = min(trials, key=lambda t: t.value)
    config = load_config(out / "best_config.yaml")
    assert config.lora_r == best.params["lora_r"]
    assert config.learning_rate == pytest.approx(best.params["learning_rate"])
    assert config.output_dir == str(out / "best")
    assert (out / "optimization_history.png").stat().st_size > 1000
    assert (out / "param_importance.png").stat().st_size > 1000
    table = (out / "sweep_results.md").read_text()
    assert f"| {best.number} | complete | {best.value:.4g} |" in table

    # the study is finished: running again resumes it and runs no new trial
    base, spec = load_sweep(path)
    assert len(run_sweep(base, spec).rows) == 4


def test_median_pruning_stops_a_bad_trial(tmp_path, make_config):
    """Two good trials, then one whose learning rate is far too high (0.5): its eval loss at
    step 2 is above the median of the others at step 2, so it is pruned there."""
    sweep = {
        "trials": 3,
        "sampler": "grid",
        "pruner": "median",
        "params": {"learning_rate": {"choices": [3.0e-3]}},
    }
    path = _write(tmp_path, make_config, sweep=sweep, max_steps=6)
    base, spec = load_sweep(path)
    spec.params = {"learning_rate": {"choices": [3.0e-3, 0.5]}}
    spec.sampler = "tpe"
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="sweep")
    for lr in (3.0e-3, 3.0e-3, 0.5):
        study.enqueue_trial({"learning_rate": lr})
    result = run_sweep(base, spec, storage=f"sqlite:///{tmp_path / 's.db'}")
    states = {r["trial"]: (r["state"], r["learning_rate"]) for r in result.rows}
    assert states[2] == ("pruned", 0.5)
    assert states[0][0] == states[1][0] == "complete"
    assert result.rows[2]["last_step"] == 2


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"params": {"learning_rat": {"low": 1, "high": 2}}}, "Did you mean 'learning_rate'"),
        ({"params": {"learning_rate": {"low": 2, "high": 1}}}, "needs numbers low < high"),
        ({"params": {"learning_rate": {"low": 0, "high": 1, "log": True}}}, "low must be > 0"),
        ({"params": {"lora_r": {"choices": []}}}, "non-empty list"),
        ({"params": {"lora_r": 8}}, "expected {choices"),
        ({"params": {"lora_r": {"low": 1, "high": 8}}, "sampler": "grid"}, "needs 'choices'"),
        ({"params": {"lora_r": {"choices": [4]}}, "sampler": "cmaes"}, "use one of tpe"),
        ({"params": {"lora_r": {"choices": [4]}}, "pruner": "sha"}, "use one of median"),
        ({"params": {"lora_r": {"choices": [4]}}, "trails": 3}, "Did you mean 'trials'"),
        ({"params": {}}, "'params' must map config keys"),
        ({"params": {"output_dir": {"choices": ["a"]}}}, "cannot be searched"),
    ],
)
def test_spec_errors(section, message):
    with pytest.raises(TunelabError, match=message.replace("{", r"\{").replace("(", r"\(")):
        parse_spec(section, "sweep.yaml")


def test_sweep_needs_eval_data_and_a_section(tmp_path, make_config, capsys):
    from tunelab.cli import main

    config = make_config()
    values = config.to_dict()
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["sweep", str(path)]) != 0
    assert "has no 'sweep:' section and no --space file" in capsys.readouterr().err
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert main(["sweep", str(path), "--space", str(space)]) != 0
    assert "the config has no eval data. Set eval_path" in capsys.readouterr().err


def test_missing_optuna_is_a_clear_error(monkeypatch):
    from tunelab.planning.sweep import import_optuna

    monkeypatch.setitem(_sys.modules, "optuna", None)
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[sweep\]'"):
        import_optuna()


def test_bad_storage_url(tmp_path, make_config):
    base, spec = load_sweep(_write(tmp_path, make_config))
    with pytest.raises(TunelabError, match="cannot open Optuna storage 'nosuchdb://x'"):
        run_sweep(base, spec, storage="nosuchdb://x")


def test_file_and_section_errors(tmp_path):
    with pytest.raises(TunelabError, match="does not exist. Pass a YAML file"):
        load_sweep(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sweep: [unclosed\n")
    with pytest.raises(TunelabError, match="broken.yaml line 2: not valid YAML"):
        load_sweep(broken)
    with pytest.raises(TunelabError, match="the sweep section must be a mapping"):
        parse_spec(["learning_rate"], "s.yaml")
    with pytest.raises(TunelabError, match="unknown field\\(s\\) lo; use low, high"):
        parse_spec({"params": {"learning_rate": {"lo": 1, "low": 1, "high": 2}}}, "s.yaml")
    with pytest.raises(TunelabError, match="trials is 0; it must be a whole number >= 1"):
        parse_spec({"trials": 0, "params": {"lora_r": {"choices": [4]}}}, "s.yaml")


def test_a_refused_combination_is_pruned_with_its_reason(tmp_path, make_config):
    sweep = {"trials": 1, "params": {"lora_dropout": {"choices": [1.5]}}}
    base, spec = load_sweep(_write(tmp_path, make_config, sweep=sweep))
    result = run_sweep(base, spec)
    assert [r["state"] for r in result.rows] == ["pruned"]
    study = optuna.load_study(study_name="sweep", storage=result.storage)
    assert "lora_dropout" in study.trials[0].user_attrs["error"]
    assert result.best_config_path is None


def test_a_sweep_range_written_with_exponents_is_numeric(tmp_path, make_config):
    path = tmp_path / "sweep.yaml"
    values = make_config(output_dir=str(tmp_path / "out")).to_dict()
    sweep = "sweep:\n  params:\n    learning_rate: {low: 1e-5, high: 1e-3}\n"
    path.write_text(yaml.safe_dump(values) + sweep)
    _, spec = load_sweep(path)
    assert spec.params["learning_rate"] == {"low": 0.00001, "high": 0.001}
