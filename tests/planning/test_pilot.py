"""The learning-curve pilot: nested shares, advice from given curves, a run on the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from tunelab.errors import TunelabError
from tunelab.planning.pilot import PilotRun, advise, nested_subsets, parse_fractions


def test_shares_are_nested_seeded_samples():
    quarter, half, everything = nested_subsets(40, (0.25, 0.5, 1.0), seed=7)
    assert (len(quarter), len(half), len(everything)) == (10, 20, 40)
    assert set(quarter) <= set(half) <= set(everything) == set(range(40))
    assert nested_subsets(40, (0.25, 0.5, 1.0), seed=7)[0] == quarter
    assert nested_subsets(40, (0.25, 0.5, 1.0), seed=8)[0] != quarter


def test_advice_follows_the_curves():
    runs = [
        PilotRun(0.25, 10, [(5, 3.0), (10, 2.8)]),
        PilotRun(0.5, 20, [(5, 2.9), (10, 2.5)]),
        PilotRun(1.0, 40, [(5, 2.8), (10, 2.2)]),
    ]
    result = advise(runs, 10)
    assert result.data_gain == pytest.approx(0.12)
    assert result.step_gain == pytest.approx(0.6 / 2.8)
    assert result.advice == [
        "More data is likely to pay: held-out loss 2.500 -> 2.200 (-12.0%) going from 50% to "
        "100% of the data at 10 steps.",
        "More steps are likely to pay: on all the data, held-out loss 2.800 at step 5 -> 2.200 "
        "at step 10 (-21.4%).",
    ]
    flat = [PilotRun(0.5, 20, [(5, 2.0), (10, 2.0)]), PilotRun(1.0, 40, [(5, 1.9), (10, 1.995)])]
    result = advise(flat, 10)
    assert result.advice[0].startswith("More data of this kind is unlikely to pay")
    assert (
        result.advice[1].startswith("More steps will not pay") and "overfitting" in result.advice[1]
    )


def test_fractions_are_checked():
    assert parse_fractions("1,0.5") == (0.5, 1.0)
    for bad in ("0.5", "0.25,0.5", "0,1", "a,1"):
        with pytest.raises(TunelabError, match="--fractions"):
            parse_fractions(bad)


def test_pilot_on_the_tiny_model_writes_curves_and_advice(make_config, tmp_path, qa_rows, capsys):
    import yaml

    from tunelab.cli import main

    held_out = write_jsonl(
        tmp_path / "heldout.jsonl",
        [{"prompt": f"Define {r['term']}.", "completion": r["definition"]} for r in qa_rows],
    )
    config = make_config(eval_path=str(held_out))
    config_path = tmp_path / "pilot.yaml"
    values = {k: getattr(config, k) for k in ("model_name", "dataset_path", "eval_path",
              "output_dir", "learning_rate", "batch_size", "max_length", "precision",
              "lora_dropout")}  # fmt: skip
    config_path.write_text(yaml.safe_dump(values))
    code = main(["pilot", str(config_path), "--fractions", "0.5,1", "--steps", "4"])
    assert code == 0
    report = json.loads((tmp_path / "run" / "pilot" / "pilot.json").read_text())
    assert report["steps"] == 4
    # the 24 training rows are 6 distinct ones repeated: deduplication keeps 6
    assert [run["examples"] for run in report["runs"]] == [3, 6]
    for run in report["runs"]:
        steps = [step for step, _ in run["curve"]]
        assert steps == [1, 2, 3, 4]  # eval every 4 // 4 = 1 step
        assert all(loss > 0 for _, loss in run["curve"])
    full = report["runs"][-1]["curve"]
    assert report["step_gain"] == pytest.approx((full[1][1] - full[-1][1]) / full[1][1])
    out = capsys.readouterr().out
    assert out.startswith("Pilot: 4 steps on each share of the data (0.5,1).")
    assert "Pilot says:" in out and report["advice"][0] in out
    assert (tmp_path / "run" / "pilot" / "data-50pct" / "adapter_config.json").is_file()


def test_shares_of_equal_size_are_refused():
    """With 2 examples, shares 0.01 and 0.5 both held 1: the pilot trained the same data
    twice and read the equal losses as 'more data is unlikely to pay'."""
    with pytest.raises(
        TunelabError, match="shares 0.01 and 0.5 of 2 training examples both hold 1"
    ):
        nested_subsets(2, (0.01, 0.5, 1.0), seed=0)
    assert [len(s) for s in nested_subsets(3, (0.5, 1.0), seed=0)] == [2, 3]


def test_pilot_of_a_preference_config_is_refused_by_objective(tmp_path):
    """A DPO config failed with the SFT data stage's 'cannot tell the schema' error, which
    told the user to rename the columns of a valid preference file."""
    from tunelab.config import FineTuningConfig
    from tunelab.planning.pilot import run_pilot

    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "Q ", "chosen": "a", "rejected": "b"}]
    )
    config = FineTuningConfig(dataset_path=str(pairs), objective="dpo", eval_split=0.5)
    with pytest.raises(TunelabError, match="tunelab pilot runs objective sft only; .* dpo"):
        run_pilot(config, (0.5, 1.0), steps=2, out_dir=tmp_path / "pilot")


def test_a_refused_pilot_prints_only_the_error(tmp_path, capsys):
    # the plan line came before the check of --fractions or --steps, as if the run had started
    from tunelab.cli import main

    config = tmp_path / "pilot.yaml"
    config.write_text("eval_split: 0.1\n")
    for args, error in (
        (["--fractions", "0.5,abc"], "error: --fractions '0.5,abc': give shares"),
        (["--steps", "-3"], "error: --steps must be at least 2 (got -3)."),
    ):
        assert main(["pilot", str(config), *args]) != 0
        captured = capsys.readouterr()
        assert "Pilot:" not in captured.out and error in captured.out + captured.err
