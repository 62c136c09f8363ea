"""Answer metrics and bootstrap confidence intervals, in plain Python and numpy.

Every metric scores one answer against one reference in [0, 1]; a system's score is the mean
over examples, so paired differences between systems can be bootstrapped example by example.
Normalisation follows SQuAD: lower case, no punctuation, no articles, single spaces.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

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


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: the longest common token subsequence over answer and reference lengths."""
    predicted, expected = tokens(answer), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    lcs = _lcs_length(predicted, expected)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(answer: str, reference: str, max_order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015, sacrebleu's sentence form): character n-gram precision and recall
    for n = 1..6, averaged over n, combined as F-beta with recall weighted beta = 2.

    Whitespace is removed first, as sacrebleu does; orders longer than either text are skipped.
    """
    hypothesis, target = "".join(answer.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, max_order + 1):
        hyp, ref = _char_ngrams(hypothesis, n), _char_ngrams(target, n)
        if not hyp or not ref:
            continue
        common = sum((hyp & ref).values())
        precisions.append(common / sum(hyp.values()))
        recalls.append(common / sum(ref.values()))
    if not precisions:
        return float(hypothesis == target)
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision == 0 and recall == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall)


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
    """Mean of ``values`` with a percentile bootstrap interval (None/NaN values are left out)."""
    import numpy as np

    data = np.asarray(_clean(values), dtype=np.float64)
    if data.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(data.mean()), float(low), float(high))


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
    if len(first) != len(second):
        raise ValueError("paired bootstrap needs two lists over the same examples")
    differences: list[float | None] = [
        None if a is None or b is None else a - b for a, b in zip(first, second, strict=True)
    ]
    return bootstrap_mean(differences, samples, seed, level)
