"""Paired differences between systems, and the verdict in plain words drawn from them.

A gap counts as real when its paired-bootstrap 95% interval excludes zero; otherwise the
verdict calls it "within noise". Nothing here is canned: every sentence is built from numbers.
"""

from __future__ import annotations

from typing import Any

from tunelab.evaluation.metrics import Interval, paired_bootstrap

LABELS = {
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "chrf": "chrF",
    "term_score": "term usage",
    "loss": "reference loss",
}
NAMES = {
    "base": "the base model",
    "few-shot": "few-shot prompting",
    "rag": "RAG",
    "tuned": "fine-tuning",
    "tuned+rag": "fine-tuning with RAG",
}
# (challenger, baseline): what a user choosing between approaches wants to know
PAIRS = (
    ("tuned", "base"),
    ("tuned", "few-shot"),
    ("tuned", "rag"),
    ("tuned+rag", "tuned"),
    ("tuned+rag", "rag"),
    ("few-shot", "base"),
    ("rag", "base"),
)


def comparisons(
    scores: dict[str, dict[str, list[float | None]]],
    metric_names: tuple[str, ...],
    samples: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """First-minus-second differences with paired bootstrap CIs for every pair in ``PAIRS``
    whose systems were both evaluated."""
    out = []
    for first, second in PAIRS:
        if first in scores and second in scores:
            for metric in metric_names:
                interval = paired_bootstrap(
                    scores[first][metric], scores[second][metric], samples, seed
                )
                out.append(
                    {"first": first, "second": second, "metric": metric, "interval": interval}
                )
    return out


def _amount(metric: str, value: float) -> str:
    if metric == "loss":
        return f"{abs(value):.2f} nats"
    return f"{abs(value) * 100:.1f} points"


def _pair_sentence(first: str, second: str, rows: list[dict[str, Any]]) -> str | None:
    wins, losses, ties = [], [], []
    for row in rows:
        interval: Interval = row["interval"]
        metric = row["metric"]
        better = -interval.mean if metric == "loss" else interval.mean  # lower loss is better
        if interval.mean != interval.mean:  # NaN: nothing to compare
            continue
        phrase = f"{LABELS[metric]} by {_amount(metric, interval.mean)}"
        if not interval.excludes_zero:
            ties.append(LABELS[metric])
        elif better > 0:
            wins.append(phrase)
        else:
            losses.append(phrase)
    if not wins and not losses and not ties:
        return None
    parts = []
    if wins:
        parts.append(f"beat {NAMES[second]} on {_join(wins)}")
    if losses:
        parts.append(
            f"trailed it on {_join(losses)}"
            if wins
            else f"trailed {NAMES[second]} on {_join(losses)}"
        )
    if ties:
        target = "" if wins or losses else f" {NAMES[second]}"
        parts.append(f"was within noise of{target or ' it'} on {_join(ties)}")
    subject = NAMES[first][0].upper() + NAMES[first][1:]
    sentence = f"{subject} " + "; ".join(parts) + "."
    return sentence


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def verdict(
    means: dict[str, dict[str, float]],
    differences: list[dict[str, Any]],
    forgetting: dict[str, Any] | None = None,
    train_seconds: float | None = None,
) -> list[str]:
    """Short plain-words findings, from system means, paired differences and forgetting."""
    sentences = []
    for first, second in PAIRS:
        rows = [d for d in differences if d["first"] == first and d["second"] == second]
        if rows:
            sentence = _pair_sentence(first, second, rows)
            if sentence:
                sentences.append(sentence)
    if means:
        best = max(means, key=lambda name: (means[name].get("token_f1", float("-inf")), name))
        lowest = min(means, key=lambda name: means[name].get("loss", float("inf")))
        sentences.append(
            f"Best token F1: {NAMES[best]} ({means[best]['token_f1'] * 100:.1f}); lowest "
            f"reference loss: {NAMES[lowest]} ({means[lowest]['loss']:.2f} nats)."
        )
    no_training = [NAMES[s] for s in ("few-shot", "rag") if s in means]
    if train_seconds is not None and ("tuned" in means or "tuned+rag" in means):
        cost = f"Fine-tuning took {train_seconds / 60:.1f} minutes of training"
        if no_training:
            cost += f"; {_join(no_training)} need none"
        sentences.append(cost + ".")
    if forgetting and "base" in forgetting and "tuned" in forgetting:
        before = forgetting["base"]["perplexity"]
        after = forgetting["tuned"]["perplexity"]
        change = (after - before) / before * 100
        direction = "rose" if change > 0 else "fell"
        sentences.append(
            f"On general prose (forgetting check) perplexity {direction} from {before:.2f} to "
            f"{after:.2f} ({change:+.1f}%)."
        )
    return sentences
