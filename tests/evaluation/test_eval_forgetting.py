"""The forgetting check scores general text as a pretrained model reads a document."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import bos_adding_tokenizer
from tunelab.evaluation.forgetting import general_passages, general_perplexity
from tunelab.models import load_tokenizer

PASSAGE = "The river ran past the mill, and the miller counted the sacks of grain by night."


@pytest.mark.parametrize("adds_bos", [False, True])
def test_general_text_is_scored_after_bos_when_the_tokenizer_adds_it(tiny_model_dir, adds_bos):
    # a Llama-2 style model always saw BOS first; scored without it, the passage starts in a
    # state it never met (and its first token goes unscored)
    from transformers import AutoModelForCausalLM

    from tests.conftest import spread_weights

    tokenizer = (
        bos_adding_tokenizer(tiny_model_dir) if adds_bos else load_tokenizer(str(tiny_model_dir))
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    spread_weights(model, seed=3)
    passage_ids = tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    ids = ([tokenizer.bos_token_id] if adds_bos else []) + passage_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    result = general_perplexity(model, tokenizer, [PASSAGE])
    assert result["tokens"] == len(passage_ids) - (0 if adds_bos else 1)
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_the_shipped_general_text_is_cut_into_passages_of_whole_paragraphs():
    passages = general_passages(passage_words=180)
    assert len(passages) > 5
    assert all(len(p.split()) >= 180 for p in passages[:-1])
