"""What a resume refuses before any training: an edited checkpoint step, a finished run; what
it carries over (the step-0 evaluation, early stopping's patience)."""

import json
import shutil

import pytest

from tunelab.api import FineTuner
from tunelab.errors import TunelabError


def unfinish(run):
    """A run folder as a crash after its last checkpoint leaves it."""
    for name in ("adapter_model.safetensors", "results.json"):
        (run / name).unlink()


def test_an_edited_checkpoint_step_is_refused_by_name(make_config, tmp_path):
    FineTuner(make_config(max_steps=4, save_steps=2)).train()
    run = tmp_path / "run"
    unfinish(run)
    folder = run / "checkpoints" / "step-000002"
    state_file = folder / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for step, expected in (
        (100, "step is 100, but the checkpoint folder step-000002 was written at step 2"),
        (3, "step is 3, but the checkpoint folder step-000002 was written at step 2"),
        (-3, "step is -3, below 0"),
    ):
        state_file.write_text(json.dumps({**state, "step": step}))
        with pytest.raises(TunelabError, match=expected) as error:
            FineTuner(make_config(max_steps=4, save_steps=2)).train(resume=True)
        assert str(state_file) in str(error.value)
        message = str(error.value).replace("Delete the folder ", "Delete ")
        assert f"Delete {folder} to resume" in message and "--overwrite" in message
    # a folder and step that agree, but past the end of the run
    beyond = run / "checkpoints" / "step-000100"
    folder.rename(beyond)
    (beyond / "trainer_state.json").write_text(json.dumps({**state, "step": 100}))
    with pytest.raises(TunelabError, match="step is 100, beyond the 4 steps this run trains for"):
        FineTuner(make_config(max_steps=4, save_steps=2)).train(resume=True)
    assert not (run / "results.json").exists()  # nothing was trained or written


def test_a_finished_run_has_nothing_to_resume_unless_max_steps_is_raised(make_config, tmp_path):
    options = dict(save_steps=2, eval_steps=2, eval_path=str(tmp_path / "train.jsonl"))
    first = FineTuner(make_config(max_steps=4, **options)).train()
    run = tmp_path / "run"
    written = (run / "results.json").read_text()
    with pytest.raises(
        TunelabError, match="this run already finished at step 4 .*nothing to resume"
    ) as error:
        FineTuner(make_config(max_steps=4, **options)).train(resume=True)
    assert "--overwrite" in str(error.value) and "raise max_steps" in str(error.value)
    assert (run / "results.json").read_text() == written  # not retrained, not rewritten
    # max_steps may change on resume: raised, the run trains further
    longer = FineTuner(make_config(max_steps=6, **options)).train(resume=True)
    assert longer["steps"] == 6
    # the step-0 evaluation (the base model) is carried over from metrics.jsonl
    assert longer["initial_eval_loss"] == first["initial_eval_loss"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["initial_eval_loss"] == first["initial_eval_loss"]


def test_early_stopping_counts_the_evaluations_before_a_resume(make_config, tmp_path, capsys):
    # a threshold no evaluation can beat: every evaluation after the first counts
    options = dict(max_steps=8, save_steps=2, eval_steps=1, eval_path=str(tmp_path / "train.jsonl"),
                   early_stopping_patience=3, early_stopping_threshold=100.0)  # fmt: skip
    whole = FineTuner(make_config(**options)).train()
    assert whole["stopped_early_at_step"] == 4
    run = tmp_path / "run"
    with pytest.raises(TunelabError, match="already finished at step 4, stopped early after 3 ev"):
        FineTuner(make_config(**options)).train(resume=True)  # patience would stop it at once
    raised = tmp_path / "raised"  # a raised patience trains further: evaluations 4 and 5 more
    shutil.copytree(run, raised)
    more = {**options, "early_stopping_patience": 5, "output_dir": str(raised)}
    assert FineTuner(make_config(**more)).train(resume=True)["stopped_early_at_step"] == 6
    shutil.rmtree(run / "checkpoints" / "step-000004")
    unfinish(run)
    capsys.readouterr()
    resumed = FineTuner(make_config(**options)).train(resume=True)
    assert resumed["stopped_early_at_step"] == 4  # one evaluation before the resume counted
    said = capsys.readouterr().out
    assert "Early stopping at step 4: the last 3 evaluations did not improve" in said, said


def test_eval_names_a_damaged_metrics_line_before_loading_the_model(
    make_config, tmp_path, monkeypatch
):
    import tunelab.generation
    from tunelab.evaluation.run import evaluate_run

    FineTuner(make_config(max_steps=2, eval_path=str(tmp_path / "train.jsonl"))).train()
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = '{"step": "x", "loss": "y"}'
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the run's files were checked")

    monkeypatch.setattr(tunelab.generation, "load_for_inference", no_model)
    with pytest.raises(TunelabError, match=r"metrics.jsonl:2: 'step' expected a whole number"):
        evaluate_run(run, systems="base", limit=1, forgetting=False, probes=())
