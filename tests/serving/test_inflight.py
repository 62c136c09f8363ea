"""The continuous-batching step loop against transformers' own ``generate``: rows prefilled
together, a row merged into a running batch, a row leaving early; every row's greedy tokens
equal ``generate``'s for its prompt alone. Needs no web framework (it runs on the lowest
versions too)."""

from __future__ import annotations

import pytest
import torch
from conftest import spread_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.serving import inflight
from tunelab.serving.jobs import Job
from tunelab.serving.models import ServedModel


@pytest.fixture(scope="module")
def lively(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spread_weights(model, seed=5, std=0.1)
    return model.eval(), tokenizer


def job(tokenizer, prompt: str, max_tokens: int) -> Job:
    served = ServedModel("model", None, tokenizer, False, None, "tiny")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return Job(served, ids, max_tokens, 0.0, 1.0, None, [], print, print, print)


def alone(model, tokenizer, ids: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return [t for t in out[0, len(ids) :].tolist() if t != tokenizer.eos_token_id]


def test_merged_and_shrinking_batches_decode_as_generate_alone(lively):
    model, tokenizer = lively
    first = job(tokenizer, "What does a compiler do with source code?", 12)
    short = job(tokenizer, "hi", 3)
    late = job(tokenizer, "Define a kernel in one long and winding sentence, please.", 10)
    batch, finished = inflight.prefill(model, [first, short])
    assert finished == [] and batch is not None and batch.mask.shape == (2, len(first.prompt_ids))
    for _ in range(2):
        batch, finished = inflight.step(model, batch)
    assert finished == [short] and len(batch.jobs) == 1  # it left; its padding went with it
    # the prompt and the two tokens run since (the third is picked, not yet run)
    assert batch.mask.shape[1] == len(first.prompt_ids) + 2 and bool(batch.mask.all())
    joining, _ = inflight.prefill(model, [late])
    batch = inflight.merge(batch, joining)  # the late prompt is longer: the running row pads
    assert [j is late for j in batch.jobs] == [False, True]
    while batch is not None:
        batch, _ = inflight.step(model, batch)
    for each in (first, short, late):
        assert each.tokens == each.max_tokens or each.finish_reason == "stop"
        assert each.ids == alone(model, tokenizer, each.prompt_ids, each.max_tokens)
    assert len(set(first.ids)) > 2  # the answers are not one repeated token
