"""tunelab eval on a preference run: the answer metrics on the chosen answers and the
preference table, in one report."""

from __future__ import annotations

import json

import pytest
from conftest import preference_pairs, write_jsonl

from tunelab.api import FineTuner
from tunelab.cli import main
from tunelab.config import FineTuningConfig
from tunelab.evaluation import metrics

COMMON = dict(
    max_length=64, precision="fp32", lora_dropout=0.0, chat_format="plain", plot=False,
    batch_size=4, logging_steps=1, target_modules=["all-linear"], learning_rate=5e-3,
)  # fmt: skip
FAST = ["--systems", "base,tuned", "--probes", "none", "--no-forgetting", "--no-semantic",
        "--max-new-tokens", "12", "--precision", "fp32"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A tiny SFT run and a tiny DPO run on the same terms, and held-out pairs."""
    folder = tmp_path_factory.mktemp("pref-eval")
    pairs = preference_pairs("What is a {}?", count=5)
    held_out = [{**p, "prompt": p["prompt"].replace("What is a", "Define")} for p in pairs]
    # the SFT run learns the held-out prompts too, so its answers score above zero
    sft_rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs + held_out]
    model = str(tiny_model_dir)
    FineTuner(FineTuningConfig(
        model_name=model, dataset_path=str(write_jsonl(folder / "sft.jsonl", sft_rows)),
        output_dir=str(folder / "sft"), max_steps=40, **COMMON,
    )).train()  # fmt: skip
    FineTuner(FineTuningConfig(
        model_name=model, dataset_path=str(write_jsonl(folder / "pairs.jsonl", pairs)),
        output_dir=str(folder / "dpo"), objective="dpo", beta=0.5, max_steps=4, **COMMON,
    )).train()  # fmt: skip
    return folder, write_jsonl(folder / "held.jsonl", held_out), held_out


def test_dpo_eval_has_answer_metrics_on_chosen_and_the_preference_table(runs, capsys):
    folder, held, held_out = runs
    out_dir = folder / "report"
    code = main(["eval", str(folder / "dpo"), "--eval-path", str(held), "--limit", "4",
                 "--sft-run", str(folder / "sft"), "--out", str(out_dir), *FAST])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tuned | 4 |" in printed and "Verdict:" in printed
    results = json.loads((out_dir / "eval_results.json").read_text())
    # three systems answered: base, the SFT run, the preference-tuned model
    assert list(results["systems"]) == ["base", "sft", "tuned"]
    assert results["examples"] == 4
    # the prompts asked are the pairs' prompts, the references their chosen answers
    assert [i["question"] for i in results["items"]] == [p["prompt"] for p in held_out[:4]]
    assert [i["reference"] for i in results["items"]] == [p["chosen"] for p in held_out[:4]]
    for name in ("base", "sft", "tuned"):
        answers = [i["answers"][name] for i in results["items"]]
        chosen = [p["chosen"] for p in held_out[:4]]
        f1 = sum(metrics.token_f1(a, c) for a, c in zip(answers, chosen, strict=True)) / 4
        em = sum(metrics.exact_match(a, c) for a, c in zip(answers, chosen, strict=True)) / 4
        assert results["systems"][name]["token_f1"]["mean"] == pytest.approx(f1, abs=1e-6)
        assert results["systems"][name]["exact_match"]["mean"] == pytest.approx(em, abs=1e-6)

    # checked by hand (SQuAD's token F1: lower case, no punctuation or articles) on the SFT
    # run's answers, which learnt the held-out prompts so they score above zero
    def words(text):
        kept = "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()
        return [w for w in kept if w not in ("a", "an", "the")]

    def f1(answer, reference):
        a, r = words(answer), words(reference)
        common = sum(min(a.count(w), r.count(w)) for w in set(a))
        return 2 * common / (len(a) + len(r)) if common else 0.0

    by_hand = [
        f1(i["answers"]["sft"], p["chosen"])
        for i, p in zip(results["items"], held_out[:4], strict=True)
    ]
    assert sum(by_hand) / 4 > 0.5
    assert results["systems"]["sft"]["token_f1"]["mean"] == pytest.approx(sum(by_hand) / 4)
    exact = [words(i["answers"]["sft"]) == words(p["chosen"])
             for i, p in zip(results["items"], held_out[:4], strict=True)]  # fmt: skip
    assert results["systems"]["sft"]["exact_match"]["mean"] == pytest.approx(sum(exact) / 4)
    # the preference table of the same pairs sits in the same results, report and files
    preference = results["preference"]
    assert list(preference["systems"]) == ["base", "sft", "tuned"]
    assert all(s["pairs"] == 4 for s in preference["systems"].values())
    assert "reward_accuracy" not in preference["systems"]["base"]
    assert preference == json.loads((out_dir / "eval_preference.json").read_text())
    html = (out_dir / "eval_report.html").read_text()
    tuned = preference["systems"]["tuned"]
    assert (f'data-preference="tuned" data-metric="reward_accuracy">'
            f"{tuned['reward_accuracy']:.1%}<") in html  # fmt: skip
    assert 'data-system="sft" data-metric="token_f1"' in html
    markdown = (out_dir / "eval_report.md").read_text()
    assert "## Held-out preference pairs" in markdown and "| sft | 4 |" in markdown
    assert any("held-out pairs the tuned model" in s for s in results["verdict"])


def test_dpo_eval_without_sft_run_has_base_and_tuned(runs, capsys):
    folder, held, _ = runs
    out_dir = folder / "report-two"
    assert main(["eval", str(folder / "dpo"), "--eval-path", str(held), "--limit", "2",
                 "--out", str(out_dir), *FAST]) == 0  # fmt: skip
    results = json.loads((out_dir / "eval_results.json").read_text())
    assert list(results["systems"]) == ["base", "tuned"]
    assert list(results["preference"]["systems"]) == ["base", "tuned"]
    # its own files (recorded in the folder's manifest) are replaced by the next eval
    assert main(["eval", str(folder / "dpo"), "--eval-path", str(held), "--limit", "1",
                 "--out", str(out_dir), *FAST]) == 0  # fmt: skip
    assert (
        json.loads((out_dir / "eval_preference.json").read_text())["systems"]["tuned"]["pairs"] == 1
    )
    assert results["examples"] == 2 and len(results["preference"]["systems"]["tuned"]) == 5


def test_kto_eval_uses_completions_labelled_true_as_references(runs, tiny_model_dir, capsys):
    folder, _, held_out = runs
    unpaired = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in preference_pairs("What is a {}?", count=5)
        for side in ("rejected", "chosen")
    ]
    held = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in held_out
        for side in ("rejected", "chosen")
    ]
    FineTuner(FineTuningConfig(
        model_name=str(tiny_model_dir),
        dataset_path=str(write_jsonl(folder / "kto.jsonl", unpaired)),
        output_dir=str(folder / "kto"), objective="kto", max_steps=2, **COMMON,
    )).train()  # fmt: skip
    held_path = write_jsonl(folder / "kto-held.jsonl", held)
    out_dir = folder / "report-kto"
    assert main(["eval", str(folder / "kto"), "--eval-path", str(held_path), "--limit", "3",
                 "--out", str(out_dir), *FAST]) == 0  # fmt: skip
    results = json.loads((out_dir / "eval_results.json").read_text())
    assert [i["reference"] for i in results["items"]] == [p["chosen"] for p in held_out[:3]]
    # the unpaired rows are paired by prompt for the preference table
    assert results["preference"]["systems"]["tuned"]["pairs"] == 3
    # no completion labelled true: nothing to use as a reference, said before any model loads
    only_bad = write_jsonl(folder / "kto-bad.jsonl", [r for r in held if not r["label"]])
    capsys.readouterr()
    assert main(["eval", str(folder / "kto"), "--eval-path", str(only_bad), *FAST]) == 2
    assert "kto-bad.jsonl: no row has a prompt and an answer" in capsys.readouterr().err


def test_sft_run_option_is_refused_on_an_sft_run(runs, capsys):
    folder, held, _ = runs
    code = main(["eval", str(folder / "sft"), "--eval-path", str(folder / "sft.jsonl"),
                 "--sft-run", str(folder / "sft"), *FAST])  # fmt: skip
    assert code == 2
    assert "--sft-run compares a preference run" in capsys.readouterr().err


def test_a_foreign_eval_preference_file_is_refused_before_loading(runs, capsys):
    folder, held, _ = runs
    out_dir = folder / "report-foreign"
    out_dir.mkdir()
    (out_dir / "eval_preference.md").write_text("my notes\n")
    code = main(["eval", str(folder / "dpo"), "--eval-path", str(held), "--limit", "1",
                 "--out", str(out_dir), *FAST])  # fmt: skip
    assert code == 2
    assert "eval_preference.md, which tunelab did not write" in capsys.readouterr().err
    assert (out_dir / "eval_preference.md").read_text() == "my notes\n"
    assert not (out_dir / "eval_report.html").exists()


def test_sft_run_must_be_an_sft_run(runs, capsys):
    """A preference run (here the evaluated run itself) given as --sft-run was evaluated and
    reported as the SFT stage."""
    folder, held, _ = runs
    code = main(["eval", str(folder / "dpo"), "--eval-path", str(held), "--limit", "1",
                 "--sft-run", str(folder / "dpo"), *FAST])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"--sft-run {folder / 'dpo'} is not an SFT run (objective: dpo)" in err
