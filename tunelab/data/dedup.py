"""Exact and near-duplicate detection: a normalised hash, and MinHash with LSH banding.

Near duplicates are measured by the Jaccard similarity of word 3-gram sets (after lower-casing
and dropping punctuation). The shingles are hashed here, in numpy for all documents at once;
datasketch's MinHash and MinHashLSH propose candidate pairs, and each candidate is confirmed
with its exact Jaccard similarity, so the reported numbers are exact and only recall depends
on the hashing.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

SHINGLE_WORDS = 3
NUM_PERM = 128
_WORD = re.compile(r"\w+")


def normalize_for_dedup(text: str) -> str:
    """Case, accents-as-composed, punctuation and spacing stop mattering."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD.findall(text))


def exact_key(text: str) -> str:
    """The hash two texts share when they are equal after ``normalize_for_dedup``."""
    return hashlib.sha1(normalize_for_dedup(text).encode("utf-8")).hexdigest()


def exact_duplicates(texts: list[str]) -> dict[int, int]:
    """``{duplicate index: index of the first equal text}``; the first of each group is kept."""
    first: dict[str, int] = {}
    duplicates = {}
    for index, text in enumerate(texts):
        key = exact_key(text)
        if key in first:
            duplicates[index] = first[key]
        else:
            first[key] = index
    return duplicates


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every document's word 3-grams, concatenated, and each one's offsets.

    Document ``i`` owns ``hashes[offsets[i]:offsets[i + 1]]``. A document with fewer than three
    words is one shingle (its whole normalised text), so it only matches its equal.
    """
    all_words: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for index, text in enumerate(texts):
        words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
        all_words.extend(words)
        lengths[index] = len(words)
    # crc32 keeps a word's hash stable across runs and datasets (unlike Python's hash())
    codes = {word: zlib.crc32(word.encode("utf-8")) for word in set(all_words)}
    ids = list(map(codes.__getitem__, all_words))
    words_arr = np.asarray(ids, dtype=np.uint64)
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # the hash of the 3-gram at each position; windows that cross a document end are dropped
    n = SHINGLE_WORDS
    if len(words_arr) >= n:
        grams = words_arr[: len(words_arr) - n + 1] * np.uint64(0x9E3779B1)
        grams = (grams ^ words_arr[1 : len(words_arr) - n + 2]) * np.uint64(0x85EBCA77)
        grams = (grams ^ words_arr[2:]) * np.uint64(0xC2B2AE3D)
        grams = (grams >> np.uint64(32)) ^ (grams & np.uint64(0xFFFFFFFF))
    else:
        grams = np.zeros(0, dtype=np.uint64)
    counts = np.maximum(lengths - n + 1, 1)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    hashes = np.empty(offsets[-1], dtype=np.uint32)
    long_docs = lengths >= n
    # gather the in-document windows of every long document in one indexing operation
    take = np.repeat(starts[:-1][long_docs], counts[long_docs]) + _ranges(counts[long_docs])
    positions = np.repeat(offsets[:-1][long_docs], counts[long_docs]) + _ranges(counts[long_docs])
    hashes[positions] = grams[take].astype(np.uint32)
    for index in np.flatnonzero(~long_docs):
        short = " ".join(_WORD.findall(unicodedata.normalize("NFKC", texts[index]).casefold()))
        hashes[offsets[index]] = zlib.crc32(("\x00" + short).encode("utf-8"))
    return hashes, offsets


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for the given counts."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that catch pairs at ``threshold`` with >= 95 % probability while
    proposing as few dissimilar pairs as possible."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.95:
            best = (bands, rows)
    return best


def candidate_pairs(
    hashes: np.ndarray,
    offsets: np.ndarray,
    threshold: float,
    num_perm: int = NUM_PERM,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, whose MinHash signatures (datasketch) share an LSH band,
    in order of ``j`` then ``i``.

    The shingle hashes of ``shingle_hashes`` go in as they are (``hashfunc=int``), so the
    library permutes them but the shingles, and the exact Jaccard that confirms each pair, stay
    tunelab's. The bands are ``lsh_bands``' choice, not datasketch's default weighting.
    """
    from datasketch import MinHash, MinHashLSH

    documents = len(offsets) - 1
    values = hashes.tolist()
    bounds = offsets.tolist()
    # one set of permutations for every document (MinHash.bulk would draw them per document)
    first = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
    signatures = []
    for index in range(documents):
        signature = MinHash(
            num_perm=num_perm,
            hashfunc=int,
            permutations=first.permutations,
            scheme=first.scheme,
        )
        signature.update_batch(values[bounds[index] : bounds[index + 1]])
        signatures.append(signature)
    lsh = MinHashLSH(num_perm=num_perm, params=lsh_bands(num_perm, threshold))
    with lsh.insertion_session() as session:
        for index, signature in enumerate(signatures):
            session.insert(index, signature, check_duplication=False)
    pairs: list[tuple[int, int]] = []
    for j, signature in enumerate(signatures):
        pairs.extend((i, j) for i in sorted(lsh.query(signature)) if i < j)
    return pairs


def jaccard(hashes: np.ndarray, offsets: np.ndarray, i: int, j: int) -> float:
    a = set(hashes[offsets[i] : offsets[i + 1]].tolist())
    b = set(hashes[offsets[j] : offsets[j + 1]].tolist())
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(
    texts: list[str], threshold: float, num_perm: int = NUM_PERM, seed: int = 0
) -> dict[int, tuple[int, float]]:
    """``{duplicate index: (kept index, Jaccard similarity)}`` for pairs at or above
    ``threshold``; of each similar group the earliest document is kept."""
    if len(texts) < 2:
        return {}
    hashes, offsets = shingle_hashes(texts)
    pairs = candidate_pairs(hashes, offsets, threshold, num_perm, seed)
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    similarity: dict[int, tuple[int, float]] = {}
    for i, j in pairs:
        score = jaccard(hashes, offsets, i, j)
        if score >= threshold:
            ri, rj = root(i), root(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
            if j not in similarity or score > similarity[j][1]:
                similarity[j] = (i, score)
    result = {}
    for index in sorted(similarity):
        kept = root(index)
        if kept != index:
            result[index] = (kept, similarity[index][1])
    return result


def cross_matches(
    texts: list[str], others: list[str], threshold: float | None, num_perm: int = NUM_PERM
) -> dict[int, tuple[int, float]]:
    """``{index in texts: (index in others, similarity)}`` for texts equal (similarity 1.0) or,
    when ``threshold`` is set, near-equal to one of ``others`` (train/eval leakage)."""
    exact = {exact_key(text): index for index, text in enumerate(others)}
    matches: dict[int, tuple[int, float]] = {}
    for index, text in enumerate(texts):
        key = exact_key(text)
        if key in exact:
            matches[index] = (exact[key], 1.0)
    if threshold is None or not texts or not others:
        return matches
    both = texts + others
    hashes, offsets = shingle_hashes(both)
    pairs = candidate_pairs(hashes, offsets, threshold, num_perm)
    split = len(texts)
    for i, j in pairs:
        if i >= split or j < split or i in matches:
            continue
        score = jaccard(hashes, offsets, i, j)
        if score >= threshold:
            matches[i] = (j - split, score)
    return matches
