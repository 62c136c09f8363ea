"""The eval command end to end on a tiny trained run: files, numbers, errors."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_jsonl
from test_eval_judge import fake_openai  # noqa: F401  (the fixture, shared)

from tunelab.errors import TunelabError


@pytest.fixture
def tiny_run(make_config, tmp_path, qa_rows):
    from tunelab.api import FineTuner

    held_out = write_jsonl(
        tmp_path / "heldout.jsonl",
        [{"prompt": f"Define {r['term']}.", "completion": r["definition"]} for r in qa_rows],
    )
    config = make_config(eval_path=str(held_out), eval_steps=3)
    FineTuner(config).train()
    return config, held_out


def test_evaluate_run_writes_reports_with_consistent_numbers(tiny_run, tmp_path):
    from tunelab.evaluation import evaluate_run

    config, held_out = tiny_run
    lines: list[str] = []
    results = evaluate_run(
        config.output_dir, held_out, max_new_tokens=6, k=2, bootstrap_samples=200,
        progress=lines.append,
    )  # fmt: skip
    assert list(results.systems) == ["base", "few-shot", "rag", "tuned", "tuned+rag"]
    assert len(results.items) == 6
    data = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    for name, result in results.systems.items():
        row = data["systems"][name]
        assert len(result.answers) == 6
        # perplexity is exp of the token-weighted loss over every reference token
        assert row["perplexity"] == pytest.approx(
            math.exp(result.reference_nll / result.reference_tokens), rel=1e-3
        )
        assert (
            0 <= row["token_f1"]["low"] <= row["token_f1"]["mean"] <= row["token_f1"]["high"] <= 1
        )
    # base and tuned share weights except the adapter: the trained adapter must move the loss
    assert data["systems"]["tuned"]["loss"]["mean"] != data["systems"]["base"]["loss"]["mean"]
    pairs = {(d["first"], d["second"]) for d in data["differences"]}
    assert ("tuned", "rag") in pairs and ("tuned+rag", "tuned") in pairs
    assert set(data["forgetting"]) == {"base", "tuned"}
    assert data["forgetting"]["base"]["tokens"] > 1000
    html = (tmp_path / "run" / "eval_report.html").read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    md = (tmp_path / "run" / "eval_report.md").read_text()
    assert results.verdict[0] in md
    # knowledge probes (reworded training items, the default) are scored and reported apart
    reworded = data["probes"]["reworded"]
    assert reworded["training_items"] == 6 and reworded["probes"] == 12
    assert set(reworded["systems"]) == set(results.systems)
    for item in reworded["items"]:
        assert item["question"] not in {f"What does {r} mean?" for r in ("byte", "kernel")}
        assert set(item["answers"]) == set(results.systems)
    assert 'data-probe="reworded" data-system="tuned" data-metric="semantic"' in html
    assert "## Knowledge probes: training items asked in other words" in md
    # each system's loss gap on the probes beyond its gap on unseen items, from the same scores
    beyond = reworded["loss_beyond_held_out"]
    assert set(beyond) == {"tuned", "rag", "tuned+rag", "few-shot"}
    probe_gap = (
        reworded["systems"]["tuned"]["loss"]["mean"] - reworded["systems"]["base"]["loss"]["mean"]
    )
    held_gap = data["systems"]["tuned"]["loss"]["mean"] - data["systems"]["base"]["loss"]["mean"]
    assert beyond["tuned"]["mean"] == pytest.approx(probe_gap - held_gap, abs=1e-5)
    assert beyond["tuned"]["low"] <= beyond["tuned"]["mean"] <= beyond["tuned"]["high"]
    assert any(s.startswith("What fine-tuning stored: On 6 training items asked in other words")
               for s in results.verdict)  # fmt: skip
    assert any(s.startswith("What this means for your choice:") for s in results.verdict)
    assert data["settings"]["semantic_model"].startswith("all-MiniLM-L6-v2")
    assert all(v is not None for v in results.systems["tuned"].scores["semantic"])
    assert any("tokens/s" in line for line in lines)


def test_eval_cli_with_config_and_subset_of_systems(
    tiny_run,
    tmp_path,
    capsys,
    qa_rows,
    fake_openai,  # noqa: F811 (the imported fixture)
):
    import yaml

    from tunelab.cli import main

    config, held_out = tiny_run
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({"model_name": config.model_name,
        "dataset_path": config.dataset_path, "output_dir": config.output_dir}))  # fmt: skip
    out = tmp_path / "report"
    code = main(["eval", str(config_path), "--eval-path", str(held_out), "--systems",
                 "tuned,base", "--limit", "3", "--max-new-tokens", "4", "--no-forgetting",
                 "--out", str(out), "--probes", "verbatim", "--probe-items", "4",
                 "--no-semantic", "--judge-url", fake_openai["url"],
                 "--judge-model", "fake"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "eval_results.json").read_text())
    assert list(data["systems"]) == ["base", "tuned"]
    assert list(data["probes"]) == ["verbatim"]
    verbatim = data["probes"]["verbatim"]
    assert verbatim["probes"] == verbatim["training_items"] == 4
    trained = {f"What does {r['term']} mean?" for r in qa_rows}
    assert all(item["question"] in trained for item in verbatim["items"])
    # asked exactly as trained, the tuned model's reference loss must be the lower
    systems = verbatim["systems"]
    assert systems["tuned"]["loss"]["mean"] < systems["base"]["loss"]["mean"]
    assert (
        systems["tuned"]["semantic"]["mean"] is None and data["settings"]["semantic_model"] is None
    )
    assert data["examples"] == 3 and data["forgetting"] is None
    assert "Verdict:" in capsys.readouterr().out
    # the judge (grade 3 for every answer it is sent; an empty answer is not sent and scores 0)
    assert data["settings"]["judge"] == {"url": fake_openai["url"], "model": "fake",
                                         "rubric": "tunelab-reference-grade-v1"}  # fmt: skip
    sent = [r["body"]["messages"][1]["content"] for r in fake_openai["requests"]]
    assert len(set(sent)) == len(sent)  # each distinct answer graded once
    for name in ("base", "tuned"):
        judged = data["systems"][name]["judge"]["mean"]
        assert judged is not None and 0 <= judged <= 0.5
    assert "LLM judge" in (out / "eval_report.md").read_text()


def test_eval_errors_name_the_problem(tiny_run, tmp_path, capsys):
    from tunelab.cli import main
    from tunelab.evaluation import evaluate_run

    config, held_out = tiny_run
    with pytest.raises(TunelabError, match=r"unknown system 'tunned'.*Did you mean 'tuned'"):
        evaluate_run(config.output_dir, held_out, systems="base,tunned")
    with pytest.raises(TunelabError, match="not a tunelab run folder"):
        evaluate_run(tmp_path, held_out)
    with pytest.raises(TunelabError, match="--eval-path .*missing.jsonl does not exist"):
        evaluate_run(config.output_dir, tmp_path / "missing.jsonl")
    with pytest.raises(TunelabError, match="--k must be at least 1"):
        evaluate_run(config.output_dir, held_out, k=0)
    prompts_only = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is a byte?"}] * 2)
    code = main(["eval", config.output_dir, "--eval-path", str(prompts_only)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "prompts.jsonl:1: cannot tell the schema" in err and "'completion'" in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("probe_items", -3, "--probe-items must be at least 1 (got -3); --probes none"),
        ("rewordings", 0, "--rewordings must be at least 1 (got 0)"),
        ("batch_size", 0, "--batch-size must be at least 1 (got 0)"),
        ("max_new_tokens", -1, "--max-new-tokens must be at least 1 (got -1)"),
        ("context_chars", 0, "--context-chars must be at least 1 (got 0)"),
        ("repetition_penalty", 0.0, "--repetition-penalty must be a positive number (got 0.0)"),
    ],
)
def test_eval_options_are_checked_before_the_run_is_read(tmp_path, option, value, message):
    """--probe-items -3 ended in random.sample's ValueError traceback; the others were found
    only where first used, after the model loaded."""
    from tunelab.evaluation import evaluate_run

    with pytest.raises(TunelabError) as caught:
        evaluate_run(tmp_path / "no-run", None, **{option: value})
    assert str(caught.value).startswith(message)
