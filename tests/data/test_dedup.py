"""Exact and near-duplicate numbers, checked against brute force."""

from __future__ import annotations

import random

from tunelab.data import dedup


def corpus(n=400, near=40, seed=0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(n)]
    copies = []
    for _ in range(near):
        words = rng.choice(base).split()
        words[rng.randrange(40)] = rng.choice(vocab)  # one word changed: Jaccard >= 0.85
        copies.append(" ".join(words))
    return base + copies


def test_exact_duplicates_ignore_case_space_punctuation():
    texts = ["Hello, World!", "hello   world", "other", "HELLO WORLD."]
    assert dedup.exact_duplicates(texts) == {1: 0, 3: 0}


def brute_force(texts, threshold):
    hashes, offsets = dedup.shingle_hashes(texts)
    found = set()
    for j in range(len(texts)):
        if any(dedup.jaccard(hashes, offsets, i, j) >= threshold for i in range(j)):
            found.add(j)
    return found


def test_near_duplicates_match_brute_force():
    texts = corpus()
    near = dedup.near_duplicates(texts, 0.8)
    assert set(near) == brute_force(texts, 0.8)
    assert len(near) == 40
    assert all(0.8 <= similarity < 1 and kept < index for index, (kept, similarity) in near.items())


def test_threshold_is_respected():
    a = " ".join(f"w{i}" for i in range(20))
    b = a.replace("w10", "x10")  # 3 of 18 shingles differ: Jaccard 15/21 = 0.714
    assert dedup.jaccard(*dedup.shingle_hashes([a, b]), 0, 1) == 15 / 21
    assert dedup.near_duplicates([a, b], 0.7) == {1: (0, 15 / 21)}
    assert dedup.near_duplicates([a, b], 0.8) == {}


def test_short_texts_only_match_their_equal():
    assert dedup.near_duplicates(["a b", "a b", "a c", ""], 0.5) == {1: (0, 1.0)}


def test_cross_matches_find_leaks():
    train = [
        "the quick brown fox jumps over the lazy dog today",
        "unrelated words here only",
        "x y",
    ]
    evals = ["The quick brown fox jumps over the lazy dog today!", "x y z"]
    assert dedup.cross_matches(train, evals, 0.8) == {0: (0, 1.0)}
    near_train = ["one two three four five six seven eight nine ten eleven twelve thirteen"]
    near_eval = ["one two three four five six seven eight nine ten eleven twelve fourteen"]
    ((index, (other, similarity)),) = dedup.cross_matches(near_train, near_eval, 0.8).items()
    assert (index, other) == (0, 0) and round(similarity, 3) == 0.833


def test_lsh_bands_catch_threshold_pairs():
    bands, rows = dedup.lsh_bands(128, 0.8)
    assert bands * rows == 128 and 1 - (1 - 0.8**rows) ** bands >= 0.95
