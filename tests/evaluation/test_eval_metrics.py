"""Metrics against hand-computed values, and bootstrap intervals on known cases."""

from __future__ import annotations

import pytest

from tunelab.evaluation import metrics


def test_exact_match_normalises_case_punctuation_and_articles():
    assert metrics.exact_match("The Cat!", "cat") == 1.0
    assert metrics.exact_match("a cat", "cats") == 0.0


def test_token_f1_by_hand():
    # 2 shared of 3 predicted and 3 expected: P = R = 2/3
    assert metrics.token_f1("red blue green", "blue green yellow") == pytest.approx(2 / 3)
    assert metrics.token_f1("red", "blue") == 0.0
    assert metrics.token_f1("", "") == 1.0
    # bags, not sets: "x x" against "x y" shares one x -> P = R = 1/2
    assert metrics.token_f1("x x", "x y") == pytest.approx(0.5)


def test_rouge_l_by_hand():
    # LCS of "x y z w" and "x z w q r" is "x z w": P = 3/4, R = 3/5, F = 2/3
    assert metrics.rouge_l("x y z w", "x z w q r") == pytest.approx(2 / 3)
    assert metrics.rouge_l("w z y x", "x y z w") == pytest.approx(0.25)


def test_chrf_by_hand():
    assert metrics.chrf("ab", "ab") == pytest.approx(1.0)
    # unigrams: P = R = 1/2; bigrams: 0; longer orders skipped -> P = R = 1/4, F2 = 1/4
    assert metrics.chrf("ab", "ac") == pytest.approx(0.25)
    # spaces are ignored, as in sacrebleu
    assert metrics.chrf("a b", "ab") == pytest.approx(1.0)
    assert metrics.chrf("xyz", "abc") == 0.0


def test_term_score_counts_whole_terms():
    terms = ["source code", "linker"]
    assert metrics.term_score("It turns Source Code into objects.", terms) == 0.5
    assert metrics.term_score("a linkers list", ["linker"]) == 0.0  # whole words only
    assert metrics.term_score("anything", []) is None


def test_bootstrap_constant_values_have_zero_width():
    interval = metrics.bootstrap_mean([1.0, 1.0, 1.0, None])
    assert (interval.mean, interval.low, interval.high) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_matches_normal_approximation():
    values = [1.0, 0.0] * 200  # mean 0.5; standard error sqrt(0.25 / 400) = 0.025
    interval = metrics.bootstrap_mean(values, samples=4000, seed=1)
    assert interval.mean == 0.5
    assert interval.high - interval.mean == pytest.approx(1.96 * 0.025, abs=0.008)
    assert interval.mean - interval.low == pytest.approx(1.96 * 0.025, abs=0.008)


def test_paired_bootstrap_sees_a_constant_gap_as_real_and_equal_lists_as_noise():
    first = [0.1, 0.9, 0.4, 0.7, 0.2] * 10
    shifted = [v + 0.05 for v in first]
    gap = metrics.paired_bootstrap(shifted, first)
    # paired: the per-question spread cancels, so even a small constant gap is certain
    assert gap.mean == pytest.approx(0.05) and gap.low == pytest.approx(0.05)
    assert gap.excludes_zero
    same = metrics.paired_bootstrap(first, first)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    with pytest.raises(ValueError):
        metrics.paired_bootstrap([1.0], [1.0, 2.0])


def test_paired_bootstrap_skips_missing_pairs():
    gap = metrics.paired_bootstrap([1.0, None, 0.5], [0.0, 1.0, None])
    assert gap.mean == 1.0


def test_chrf_and_rouge_l_agree_with_the_reference_implementations():
    import random

    import sacrebleu
    from rouge_score import rouge_scorer as rouge_score

    rng = random.Random(0)
    words = "compiler kernel byte code machine source program memory data stack".split()
    scorer = rouge_score.RougeScorer(["rougeL"])
    for _ in range(50):
        a = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        b = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        assert metrics.chrf(a, b) == pytest.approx(sacrebleu.sentence_chrf(a, [b]).score / 100)
        assert metrics.rouge_l(a, b) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure)


def test_rouge_l_reads_the_words_token_f1_reads_in_any_language():
    # rouge-score's own tokenizer keeps ASCII letters only ("größe" -> "gr e"); ours keeps words
    # and drops articles: LCS 3 of 3 and 4 words -> P = 1, R = 3/4, F = 6/7
    assert metrics.rouge_l("Größe der Datei", "die Größe der Datei") == pytest.approx(6 / 7)
    assert metrics.rouge_l("The cat", "a cat") == 1.0
    assert metrics.rouge_l("the", "a") == 1.0 and metrics.rouge_l("", "cat") == 0.0


def test_chrf_options_reach_sacrebleu_and_two_empty_texts_agree():
    # bigrams only: "ab" vs "ac" -> unigram P = R = 1/2, bigram 0 -> 1/4; beta 1 gives the same
    assert metrics.chrf("ab", "ac", max_order=2, beta=1.0) == pytest.approx(0.25)
    assert metrics.chrf("abc", "abd", max_order=1) == pytest.approx(2 / 3)
    assert metrics.chrf("", " ") == 1.0 and metrics.chrf("", "a") == 0.0


def test_bootstrap_draws_the_resamples_the_report_always_drew():
    # scipy's percentile bootstrap draws rng.integers(0, n, (samples, n)) from the seeded
    # generator, as tunelab's own code did: the report's intervals are unchanged
    import numpy as np

    values = [0.0, 0.25, 1.0, 0.5, 0.75, 1.0, 0.0, 0.4]
    draws = np.random.default_rng(3).integers(0, len(values), size=(500, len(values)))
    means = np.asarray(values)[draws].mean(axis=1)
    low, high = np.percentile(means, [5, 95])
    interval = metrics.bootstrap_mean(values, samples=500, seed=3, level=0.9)
    assert interval.mean == pytest.approx(np.mean(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)
    assert metrics.bootstrap_mean([0.7, None]) == metrics.Interval(0.7, 0.7, 0.7)
