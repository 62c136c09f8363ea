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
    "semantic": "semantic similarity",
    "judge": "LLM judge",
    "loss": "reference loss",
}
NAMES = {
    "base": "the base model",
    "few-shot": "few-shot prompting",
    "rag": "RAG",
    "sft": "the SFT run",
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
    ("tuned", "sft"),  # a preference run against the SFT run it started from
    ("sft", "base"),
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


PROBE_WORDS = {
    "reworded": "training items asked in other words",
    "verbatim": "training questions asked exactly as trained",
}


def _gap(differences: list[dict[str, Any]], first: str, second: str, metric: str) -> Any:
    for d in differences:
        if (d["first"], d["second"], d["metric"]) == (first, second, metric):
            interval: Interval = d["interval"]
            return None if interval.mean != interval.mean else interval
    return None


def _gap_words(interval: Interval, metric: str) -> str:
    """'+12.3 points (95% CI +4.1 to +20.0), a real gain' and the like."""
    scale, unit, digits = (1.0, " nats", 2) if metric == "loss" else (100.0, " points", 1)
    better = -interval.mean if metric == "loss" else interval.mean
    if not interval.excludes_zero:
        judgement = "within noise"
    else:
        judgement = "a real gain" if better > 0 else "a real loss"
    return (
        f"{interval.mean * scale:+.{digits}f}{unit} (95% CI {interval.low * scale:+.{digits}f} "
        f"to {interval.high * scale:+.{digits}f}), {judgement}"
    )


def _real_gain(interval: Any, metric: str) -> bool:
    if interval is None or not interval.excludes_zero:
        return False
    return (-interval.mean if metric == "loss" else interval.mean) > 0


def knowledge_verdict(
    probes: dict[str, tuple[dict[str, dict[str, Interval]], list[dict[str, Any]], int]],
    held_out: dict[str, dict[str, Interval]],
    held_out_differences: list[dict[str, Any]],
    answer_words: dict[str, float],
    metric: str = "semantic",
    beyond: dict[str, dict[str, Interval]] | None = None,
) -> list[str]:
    """What fine-tuning stored, what retrieval found (knowledge probes: kind -> (summary,
    differences, training items)), what fine-tuning changed on unseen items, and what that
    means for the choice; every claim carries its paired-bootstrap 95% interval on ``metric``
    (semantic similarity, or token F1 where the embedding model is not installed).

    ``beyond`` (kind -> system -> interval) is each system's reference-loss gap to the base
    model on that probe minus its gap on unseen items (``metrics.difference_in_differences``):
    the part of a gain that is about the training items themselves, not the style or format a
    system brings to every answer. A system whose answers do not improve can still have found
    the facts there (the reference answers became likelier), and the verdict says so."""
    label = LABELS[metric]
    beyond = beyond or {}
    sentences = []
    stored = found = False  # in the answers or in the reference loss beyond style
    found_in_answers = False
    for kind, (summary, differences, count) in probes.items():
        where = f"On {count} {PROBE_WORDS[kind]}"
        for system, subject, opening in (
            ("tuned", "the tuned model", "What fine-tuning stored"),
            ("rag", "RAG over the training data", "What retrieval found"),
        ):
            gap = _gap(differences, system, "base", metric)
            if gap is None:
                continue
            sentence = (
                f"{opening}: {where}, {subject} scored {summary[system][metric].mean * 100:.1f} "
                f"on {label} against the base model's {summary['base'][metric].mean * 100:.1f}: "
                f"{_gap_words(gap, metric)}."
            )
            extra = beyond.get(kind, {}).get(system)
            in_answers = _real_gain(gap, metric)
            in_loss = _real_gain(extra, "loss")
            if extra is not None and extra.mean == extra.mean:
                loss_gap = _gap(differences, system, "base", "loss")
                sentence += (
                    " Its reference loss there "
                    + (f"changed by {loss_gap.mean:+.2f} nats; " if loss_gap is not None else "")
                    + f"beyond its change on unseen items: {_gap_words(extra, 'loss')}"
                    + (
                        ": the reference answers became likelier, but the answers it gave did "
                        "not show it."
                        if in_loss and not in_answers
                        else "."
                    )
                )
            if kind == "reworded":
                if system == "tuned":
                    stored = stored or in_answers or in_loss
                else:
                    found = found or in_answers or in_loss
                    found_in_answers = found_in_answers or in_answers
            sentences.append(sentence)
        head_to_head = _gap(differences, "tuned", "rag", metric)
        if head_to_head is not None:
            sentences.append(f"{where}, fine-tuning minus RAG: {_gap_words(head_to_head, metric)}.")
    style_gap = _gap(held_out_differences, "tuned", "base", metric)
    if style_gap is not None and "base" in answer_words and "tuned" in answer_words:
        sentences.append(
            f"What fine-tuning changed on unseen items: answers of {answer_words['tuned']:.0f} "
            f"words on average (base model {answer_words['base']:.0f}); {label} "
            f"{_gap_words(style_gap, metric)}; the reference loss "
            + (
                _gap_words(loss_gap, "loss")
                if (loss_gap := _gap(held_out_differences, "tuned", "base", "loss"))
                else "was not compared"
            )
            + " (style and format: no system can know an unseen item's facts)."
        )
    if "reworded" in probes:
        sentences.append(_choice(stored, found, probes["reworded"][1], metric, found_in_answers))
    return sentences


def _choice(
    stored: bool,
    found: bool,
    differences: list[dict[str, Any]],
    metric: str,
    found_in_answers: bool = True,
) -> str:
    """What the knowledge-probe findings mean for choosing between the approaches."""
    both = _gap(differences, "tuned+rag", "rag", metric)
    rag_ahead = _real_gain(_gap(differences, "rag", "tuned", metric), metric)
    if found and not found_in_answers and not rag_ahead:
        advice = (
            "Retrieval finds the facts in your data (with the documents, the reference answers "
            "became likelier) but this model does not carry them into its answers"
            + (", and fine-tuning stored some of them" if stored else "")
            + ". A larger or more instruction-following base model, fewer and shorter "
            "documents (--k, --context-chars), or fine-tuning on answers written from "
            "retrieved documents would let retrieval pay; until then neither route delivers "
            "the facts in the answers."
        )
    elif found and (not stored or rag_ahead):
        advice = (
            "For the facts in your data, retrieval is the surer route: it found them where "
            "fine-tuning "
            + ("stored less" if stored else "did not measurably store them")
            + ". Keep fine-tuning for style or format only if the unseen-item results show a gain."
        )
    elif stored and not found:
        advice = (
            "Fine-tuning stored facts that retrieval did not find: fine-tuning fits this data, "
            "or improve the retriever (try --retriever embedding) before choosing."
        )
    elif stored and found:
        advice = "Both fine-tuning and retrieval recovered the training facts"
        advice += (
            "; combined they beat RAG alone by " + _gap_words(both, metric) + "."
            if both is not None
            else "."
        )
    else:
        advice = (
            "Neither fine-tuning nor retrieval measurably recovered the training facts on "
            "reworded questions: more training steps or data, or a "
            "better retriever, before drawing a conclusion."
        )
    return "What this means for your choice: " + advice
