"""One pass per prompt for loss and answer gives what the loss pass and ``generate`` give apart."""

from __future__ import annotations

import pytest
from conftest import spread_weights

from tunelab.evaluation.scoring import reference_losses, timed_generation
from tunelab.evaluation.shared_pass import prepare, score_and_generate
from tunelab.generation import load_for_inference

QUESTIONS = [
    "What does compiler mean?",
    "Define kernel.",
    "A byte is eight bits. A kilobyte is 1024 bytes. What is a byte? Define kernel, and TCP.",
    "What is recursion?",
    "An interpreter executes a program directly. What does interpreter mean?",
]
ANSWERS = [
    "A compiler translates source code into machine code.",
    "The kernel is the core of an operating system.",
    "Eight bits.",
    "Recursion is when a function calls itself, as in a linked list of nodes.",
    "It executes a program statement by statement.",
]


def texts(tokenizer):
    prompts, fulls = [], []
    for question, answer in zip(QUESTIONS, ANSWERS, strict=True):
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False
        )
        prompts.append(prompt)
        fulls.append(full)
    return prompts, fulls


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir), precision="fp32")
    spread_weights(loaded.model, seed=0)
    return loaded


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_shared_pass_matches_separate_loss_and_generation(loaded, penalty):
    prompts, fulls = texts(loaded.tokenizer)
    # a random model rarely says its real EOS: the third token of the first answer stops it
    encoded = loaded.tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    tokens = loaded.model.generate(**encoded, max_new_tokens=3, do_sample=False)
    stop = int(tokens[0, -1])
    unstopped = timed_generation(loaded, prompts[:1], 10, 1, penalty).answers[0]
    original = loaded.tokenizer.eos_token_id
    loaded.tokenizer.eos_token_id = stop
    try:
        # batches of 2 mix prompt lengths, so rows are left-padded and references right-padded
        apart_losses = reference_losses(loaded.model, loaded.tokenizer, prompts, fulls, 2)
        apart = timed_generation(loaded, prompts, 10, 2, penalty)
        losses, generated, loss_seconds = score_and_generate(loaded, prompts, fulls, 10, 2, penalty)
    finally:
        loaded.tokenizer.eos_token_id = original
    assert generated.answers == apart.answers
    assert generated.new_tokens == apart.new_tokens
    assert len(generated.answers[0]) < len(unstopped)  # it stopped, the others went on
    for one, other in zip(losses, apart_losses, strict=True):
        assert one.tokens == other.tokens > 0
        assert one.nll_sum == pytest.approx(other.nll_sum, rel=1e-5)
    assert generated.seconds > 0 and loss_seconds > 0


def test_texts_that_cannot_share_a_pass_are_scored_apart(loaded):
    tokenizer = loaded.tokenizer
    prompts, fulls = texts(tokenizer)
    # a prompt whose last word merges with the reference's first: its own tokens differ
    prompts.append("A kilo")
    fulls.append("A kilobyte is 1024 bytes.")
    assert tokenizer("A kilo")["input_ids"] != tokenizer(fulls[-1])["input_ids"][:2]
    prepared = prepare(tokenizer, prompts, fulls)
    assert prepared[-1] is None and all(p is not None for p in prepared[:-1])
    # a text cut at max_tokens is not shared either
    short = prepare(tokenizer, prompts[:1], fulls[:1], max_tokens=5)
    assert short == [None]
    losses, generated, _ = score_and_generate(loaded, prompts, fulls, 6, 4)
    apart = reference_losses(loaded.model, tokenizer, prompts[-1:], fulls[-1:])
    assert losses[-1].nll_sum == pytest.approx(apart[0].nll_sum, rel=1e-5)
    assert generated.answers[-1] == timed_generation(loaded, prompts[-1:], 6).answers[0]


def test_one_batch_of_several_systems_answers_as_one_prompt_at_a_time(loaded):
    """Few-shot, RAG and plain prompts of every question in one batch of 15 (left-padded to
    very different lengths, rows stopping at different steps and leaving the batch a quarter
    at a time) give the answers ``generate`` gives one prompt at a time, and the same losses."""
    tokenizer = loaded.tokenizer
    prompts, fulls = [], []
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        others = [
            (q, a) for j, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)) if j != i
        ][:2]
        shots = [t for q, a in others for t in ({"role": "user", "content": q},
                 {"role": "assistant", "content": a})]  # fmt: skip
        documents = "Reference documents:\n\n" + "\n\n".join(a for _, a in others)
        for messages in (
            [{"role": "user", "content": question}],
            shots + [{"role": "user", "content": question}],
            [{"role": "user", "content": f"{documents}\n\n{question}"}],
        ):
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": answer}], tokenize=False
            )
            prompts.append(prompt)
            fulls.append(full)
    # stop on a token the random model says early in some answers and late or never in others
    encoded = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    stop = int(loaded.model.generate(**encoded, max_new_tokens=2, do_sample=False)[0, -1])
    original = tokenizer.eos_token_id
    tokenizer.eos_token_id = stop
    try:
        one_at_a_time = [timed_generation(loaded, [p], 12, 1).answers[0] for p in prompts]
        alone = [
            score_and_generate(loaded, [p], [f], 12, 1)[0][0]
            for p, f in zip(prompts, fulls, strict=True)
        ]
        losses, generated, _ = score_and_generate(loaded, prompts, fulls, 12, 32)
    finally:
        tokenizer.eos_token_id = original
    lengths = {len(tokenizer(a)["input_ids"]) for a in one_at_a_time}
    assert len(lengths) > 2  # rows really did stop at different steps
    assert generated.answers == one_at_a_time
    for batched, single in zip(losses, alone, strict=True):
        assert batched.tokens == single.tokens > 0
        assert batched.nll_sum == pytest.approx(single.nll_sum, rel=1e-5)
