"""The verdict is built from the numbers it is given."""

from __future__ import annotations

import pytest

from tunelab.evaluation.metrics import Interval
from tunelab.evaluation.verdict import comparisons, verdict


def diff(first, second, metric, mean, low, high):
    return {"first": first, "second": second, "metric": metric,
            "interval": Interval(mean, low, high)}  # fmt: skip


def test_verdict_sentences_from_given_numbers():
    differences = [
        diff("tuned", "rag", "term_score", 0.18, 0.12, 0.24),
        diff("tuned", "rag", "exact_match", 0.005, -0.01, 0.02),
        diff("tuned", "rag", "loss", -0.4, -0.5, -0.3),
        diff("rag", "base", "token_f1", -0.031, -0.05, -0.01),
    ]
    means = {
        "base": {"token_f1": 0.20, "loss": 2.5},
        "rag": {"token_f1": 0.17, "loss": 2.2},
        "tuned": {"token_f1": 0.25, "loss": 1.8},
    }
    forgetting = {"base": {"perplexity": 20.0}, "tuned": {"perplexity": 22.0}}
    sentences = verdict(means, differences, forgetting, train_seconds=480)
    assert sentences == [
        "Fine-tuning beat RAG on term usage by 18.0 points and reference loss by 0.40 nats; "
        "was within noise of it on exact match.",
        "RAG trailed the base model on token F1 by 3.1 points.",
        "Best token F1: fine-tuning (25.0); lowest reference loss: fine-tuning (1.80 nats).",
        "Fine-tuning took 8.0 minutes of training; RAG need none.",
        "On general prose (forgetting check) perplexity rose from 20.00 to 22.00 (+10.0%).",
    ]


def test_comparisons_cover_only_evaluated_pairs():
    scores = {
        "base": {"token_f1": [0.1, 0.2, 0.3]},
        "tuned": {"token_f1": [0.3, 0.4, 0.5]},
    }
    rows = comparisons(scores, ("token_f1",), samples=100)
    assert [(r["first"], r["second"]) for r in rows] == [("tuned", "base")]
    assert rows[0]["interval"].mean == pytest.approx(0.2) and rows[0]["interval"].excludes_zero


def test_knowledge_verdict_says_what_was_stored_found_and_changed():
    from tunelab.evaluation.verdict import knowledge_verdict

    def summary(values):
        return {name: {"semantic": Interval(v, v - 0.05, v + 0.05)} for name, v in values.items()}

    probe_differences = [
        diff("tuned", "base", "semantic", 0.02, -0.03, 0.07),
        diff("rag", "base", "semantic", 0.30, 0.22, 0.38),
        diff("tuned", "rag", "semantic", -0.28, -0.36, -0.20),
    ]
    held_out_differences = [
        diff("tuned", "base", "semantic", 0.06, 0.01, 0.11),
        diff("tuned", "base", "loss", -0.5, -0.7, -0.3),
    ]
    sentences = knowledge_verdict(
        {"reworded": (summary({"base": 0.40, "rag": 0.70, "tuned": 0.42}), probe_differences, 25)},
        {}, held_out_differences, {"base": 61.0, "tuned": 23.4},
    )  # fmt: skip
    assert sentences == [
        "What fine-tuning stored: On 25 training items asked in other words, the tuned model "
        "scored 42.0 on semantic similarity against the base model's 40.0: +2.0 points (95% CI "
        "-3.0 to +7.0), within noise.",
        "What retrieval found: On 25 training items asked in other words, RAG over the training "
        "data scored 70.0 on semantic similarity against the base model's 40.0: +30.0 points "
        "(95% CI +22.0 to +38.0), a real gain.",
        "On 25 training items asked in other words, fine-tuning minus RAG: -28.0 points (95% CI "
        "-36.0 to -20.0), a real loss.",
        "What fine-tuning changed on unseen items: answers of 23 words on average (base model "
        "61); semantic similarity +6.0 points (95% CI +1.0 to +11.0), a real gain; the "
        "reference loss -0.50 nats (95% CI -0.70 to -0.30), a real gain (style and format: no "
        "system can know an unseen item's facts).",
        "What this means for your choice: For the facts in your data, retrieval is the surer "
        "route: it found them where fine-tuning did not measurably store them. Keep fine-tuning "
        "for style or format only if the unseen-item results show a gain.",
    ]


def test_knowledge_verdict_tells_facts_found_apart_from_facts_used():
    """The demo's case: with the documents the reference answers became far likelier, beyond
    the documents' effect on unseen items, while the answers' similarity did not rise. The
    verdict must say retrieval found the facts but the model did not use them, not that
    neither route recovered anything."""
    from tunelab.evaluation.verdict import knowledge_verdict

    def summary(values):
        return {name: {"semantic": Interval(v, v - 0.05, v + 0.05)} for name, v in values.items()}

    probe_differences = [
        diff("tuned", "base", "semantic", -0.05, -0.13, 0.02),
        diff("tuned", "base", "loss", -0.65, -0.9, -0.4),
        diff("rag", "base", "semantic", -0.10, -0.21, 0.02),
        diff("rag", "base", "loss", -2.99, -3.3, -2.6),
        diff("tuned", "rag", "semantic", 0.05, -0.02, 0.12),
    ]
    held_out_differences = [diff("tuned", "base", "semantic", 0.01, -0.1, 0.12)]
    beyond = {
        "reworded": {"tuned": Interval(-0.03, -0.2, 0.15), "rag": Interval(-2.76, -3.1, -2.4)}
    }
    sentences = knowledge_verdict(
        {"reworded": (summary({"base": 0.47, "rag": 0.37, "tuned": 0.42}), probe_differences, 10)},
        {}, held_out_differences, {"base": 37.0, "tuned": 38.0}, "semantic", beyond,
    )  # fmt: skip
    assert sentences[0] == (
        "What fine-tuning stored: On 10 training items asked in other words, the tuned model "
        "scored 42.0 on semantic similarity against the base model's 47.0: -5.0 points (95% CI "
        "-13.0 to +2.0), within noise. Its reference loss there changed by -0.65 nats; beyond "
        "its change on unseen items: -0.03 nats (95% CI -0.20 to +0.15), within noise."
    )
    assert sentences[1] == (
        "What retrieval found: On 10 training items asked in other words, RAG over the training "
        "data scored 37.0 on semantic similarity against the base model's 47.0: -10.0 points "
        "(95% CI -21.0 to +2.0), within noise. Its reference loss there changed by -2.99 nats; "
        "beyond its change on unseen items: -2.76 nats (95% CI -3.10 to -2.40), a real gain: "
        "the reference answers became likelier, but the answers it gave did not show it."
    )
    assert sentences[-1].startswith(
        "What this means for your choice: Retrieval finds the facts in your data (with the "
        "documents, the reference answers became likelier) but this model does not carry them "
        "into its answers."
    )
    # without the loss evidence the same answers read as nothing found (the old verdict)
    plain = knowledge_verdict(
        {"reworded": (summary({"base": 0.47, "rag": 0.37, "tuned": 0.42}), probe_differences, 10)},
        {}, held_out_differences, {"base": 37.0, "tuned": 38.0}, "semantic",
    )  # fmt: skip
    assert plain[-1].startswith("What this means for your choice: Neither fine-tuning nor")


def test_difference_in_differences_subtracts_the_unseen_items_gap():
    from tunelab.evaluation.metrics import difference_in_differences

    rng = __import__("random").Random(0)
    base = [rng.uniform(2, 4) for _ in range(40)]
    probe_tuned = [b - 1.0 + rng.uniform(-0.1, 0.1) for b in base]  # 1 nat better
    held_base = [rng.uniform(2, 4) for _ in range(30)]
    held_tuned = [b - 0.4 + rng.uniform(-0.1, 0.1) for b in held_base]  # 0.4 nats: style
    gap = difference_in_differences(probe_tuned, base, held_tuned, held_base, 500, 0)
    expected = (
        sum(map(float.__sub__, probe_tuned, base)) / 40
        - sum(map(float.__sub__, held_tuned, held_base)) / 30
    )
    assert gap.mean == pytest.approx(expected) and gap.mean == pytest.approx(-0.6, abs=0.05)
    assert gap.low < gap.mean < gap.high < 0  # a real extra gain, narrow since noise is small
    same = difference_in_differences(held_tuned, held_base, held_tuned, held_base, 500, 0)
    assert same.mean == 0 and same.low < 0 < same.high
    # a missing value drops its pair; a single observation is held fixed, not resampled
    one = difference_in_differences([1.0, None], [0.5, 0.0], held_tuned, held_base, 500, 0)
    assert one.mean == pytest.approx(0.5 - sum(map(float.__sub__, held_tuned, held_base)) / 30)
    assert one.low < one.mean < one.high
    with pytest.raises(ValueError, match="same examples"):
        difference_in_differences([1.0], [1.0, 2.0], [1.0], [1.0])


def test_probe_text_table_reads_eval_results_and_shows_missing_values_as_na():
    """The demo's and the replay benchmark's side-by-side table, from eval_results.json."""
    from tunelab.evaluation.probe_report import probes_text

    def cell(mean):
        return {
            "mean": mean,
            "low": None if mean is None else mean - 0.1,
            "high": mean and mean + 0.1,
        }

    systems = {name: {"token_f1": cell(f1), "loss": cell(loss)}
               for name, f1, loss in (("base", 0.2, 3.5), ("tuned", None, 3.0))}  # fmt: skip
    data = {"settings": {"semantic_model": None}, "systems": systems,
            "probes": {"reworded": {"systems": systems}}}  # fmt: skip
    header, labels, base, tuned = probes_text(data)
    assert header.split() == ["system", "held-out", "reworded"]
    assert labels.split().count("F1") == 2 and "loss" in labels
    assert base.split("/")[0].split() == ["base", "20.0", "[10.0,", "30.0]"]
    assert "3.500 [3.400, 3.600]" in base
    assert tuned.split()[:4] == ["tuned", "n/a", "[n/a,", "n/a]"]
