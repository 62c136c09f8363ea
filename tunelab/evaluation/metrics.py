"""Answer metrics and bootstrap confidence intervals.

Every metric scores one answer against one reference in [0, 1]; a system's score is the mean
over examples, so paired differences between systems can be bootstrapped example by example.
Normalisation follows SQuAD: lower case, no punctuation, no articles, single spaces.
ROUGE-L is rouge-score's, chrF sacrebleu's, the intervals scipy's; exact match and token F1
are the SQuAD script's few lines (its only packaged form, HF evaluate, downloads the script).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"[a-z0-9][a-z0-9'+#-]*")


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation and articles removed, spaces folded."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall (bags of words)."""
    predicted, expected = tokens(answer), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


class _Words:
    """rouge-score's tokenizer interface over ``tokens``: its default keeps ASCII letters only
    (it would drop every word of a non-English answer) and keeps articles, where ROUGE-L here
    reads the same words as token F1."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_Words())


@lru_cache(maxsize=4)
def _chrf_metric(max_order: int, beta: float) -> Any:
    from sacrebleu.metrics import CHRF

    # chrF, not chrF++: no word n-grams; whitespace removed, as in the paper
    # sacrebleu annotates beta as int but computes with it as a number (beta ** 2)
    return CHRF(char_order=max_order, word_order=0, beta=beta)  # type: ignore[arg-type]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score): the longest common token subsequence over answer and reference
    lengths, on the words of ``tokens``. Two texts without words score 1 (both say nothing),
    one without words 0."""
    if not tokens(answer) or not tokens(reference):
        return float(tokens(answer) == tokens(reference))
    return float(_rouge_l_scorer().score(reference, answer)["rougeL"].fmeasure)


def chrf(answer: str, reference: str, max_order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015) as sacrebleu's sentence score, in [0, 1]: character n-gram
    precision and recall for n = 1..``max_order`` (whitespace removed first), combined as
    F-beta with recall weighted ``beta``. Two empty texts score 1 (sacrebleu says 0), as for
    the other metrics here."""
    if not answer.split() and not reference.split():
        return 1.0
    return _chrf_metric(max_order, float(beta)).sentence_score(answer, [reference]).score / 100


def term_score(answer: str, terms: list[str]) -> float | None:
    """Share of ``terms`` that appear in the answer as whole words (case-insensitive);
    None when there are no terms to look for."""
    if not terms:
        return None
    words = f" {normalize(answer)} "
    found = sum(1 for term in terms if f" {normalize(term)} " in words)
    return found / len(terms)


def word_list(text: str) -> list[str]:
    """Lower-case words (letters, digits, and the inner -'+# of words like C++ or don't)."""
    return _WORD.findall(text.lower())


@dataclass
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _clean(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def bootstrap_mean(
    values: list[float | None], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval at ``level`` (scipy's
    ``stats.bootstrap``, ``samples`` resamples drawn from ``default_rng(seed)``); None/NaN
    values are left out. No values: all NaN; one value: that value three times."""
    import numpy as np
    from scipy import stats

    data = np.asarray(_clean(values), dtype=np.float64)
    if data.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(data.mean())
    if data.size == 1:  # scipy refuses a single observation; every resample is that value
        return Interval(mean, mean, mean)
    result = stats.bootstrap(
        (data,),
        np.mean,
        n_resamples=samples,
        confidence_level=level,
        method="percentile",  # BCa (scipy's default) is NaN for constant data, common here
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    interval = result.confidence_interval
    return Interval(mean, float(interval.low), float(interval.high))


def paired_bootstrap(
    first: list[float | None],
    second: list[float | None],
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Mean of ``first - second`` over the same examples, with a paired bootstrap interval:
    examples are resampled together, so what varies is which questions were asked, not which
    system answered. Pairs where either value is missing are left out."""
    return bootstrap_mean(_differences(first, second), samples, seed, level)


def _differences(first: list[float | None], second: list[float | None]) -> list[float | None]:
    """``first - second`` item by item, None where either is missing."""
    if len(first) != len(second):
        raise ValueError("paired values need two lists over the same examples")
    return [None if a is None or b is None else a - b for a, b in zip(first, second, strict=True)]


def difference_in_differences(
    first: list[float | None],
    second: list[float | None],
    first_elsewhere: list[float | None],
    second_elsewhere: list[float | None],
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """How much more ``first`` gains over ``second`` on one set of items than on another: the
    mean of ``first - second`` (paired, per item) minus the mean of ``first_elsewhere -
    second_elsewhere`` over a second, unrelated set of items. The two sets of paired
    differences are resampled independently (scipy's two-sample ``stats.bootstrap``, percentile
    interval at ``level``, ``samples`` resamples from ``default_rng(seed)``). Used to separate
    what fine-tuning stored about training items from what it changed everywhere (style,
    format): the gain on reworded training items beyond the gain on unseen items. Pairs with a
    missing value are left out; either set empty: all NaN."""
    import numpy as np
    from scipy import stats

    here, there = (
        np.asarray(_clean(_differences(a, b)), dtype=np.float64)
        for a, b in ((first, second), (first_elsewhere, second_elsewhere))
    )
    if here.size == 0 or there.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(here.mean() - there.mean())
    if here.size == 1 or there.size == 1:  # scipy resamples no single observation: it is fixed
        if here.size == there.size:
            return Interval(mean, mean, mean)
        varied = bootstrap_mean(list(here if here.size > 1 else -there), samples, seed, level)
        offset = float(-there[0]) if there.size == 1 else float(here[0])
        return Interval(mean, varied.low + offset, varied.high + offset)

    def statistic(x: Any, y: Any, axis: int = -1) -> Any:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    result = stats.bootstrap(
        (here, there), statistic, n_resamples=samples, confidence_level=level,
        method="percentile", paired=False, vectorized=True, rng=np.random.default_rng(seed),
    )  # fmt: skip
    interval = result.confidence_interval
    return Interval(mean, float(interval.low), float(interval.high))
