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
