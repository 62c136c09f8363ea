"""Held-out items from each schema, and the prompt each system sees."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import bos_adding_tokenizer
from tunelab.data.schema import Example
from tunelab.errors import TunelabError
from tunelab.evaluation.retrieval import BM25
from tunelab.evaluation.systems import EvalItem, PromptBuilder, document, to_item, to_items

POOL = [
    EvalItem("What does compiler mean?", "Translates source code.", "t:1"),
    EvalItem("What does byte mean?", "Eight bits.", "t:2"),
    EvalItem("What does kernel mean?", "Core of an operating system.", "t:3"),
    EvalItem("What does compiler optimisation mean?", "Making compiled code faster.", "t:4"),
]


def builder(tokenizer, chat, **options) -> PromptBuilder:
    index = BM25([document(p) for p in POOL])
    return PromptBuilder(tokenizer, chat, "Be brief.", POOL, index, **options)


def test_items_from_every_schema():
    pair = to_item(Example("f:1", prompt="Q?", completion="A."))
    assert (pair.question, pair.reference, pair.continuation) == ("Q?", "A.", False)
    chat = Example(
        "f:2",
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "define byte"},
            {"role": "assistant", "content": "eight bits"},
        ],
    )
    assert (to_item(chat).question, to_item(chat).reference) == ("define byte", "eight bits")
    text = to_item(Example("f:3", text="one two three four five six"))
    assert (text.question, text.reference, text.continuation) == (
        "one two three", "four five six", True,
    )  # fmt: skip
    assert to_item(Example("f:4", text="single")) is None


def test_items_error_names_the_file_and_what_is_expected():
    with pytest.raises(TunelabError, match=r"held\.jsonl: no example has a reference.*f:9"):
        to_items([Example("f:9", text="word")], "held.jsonl")


def test_plain_few_shot_joins_the_most_similar_pairs_as_in_training():
    plain = builder(SimpleNamespace(eos_token="</s>"), chat=False, k=2)
    item = EvalItem("What does compiler mean?", "Turns code into code.", "h:1")
    prompt, full = plain.render("few-shot", item, 0)
    # the identical training question is left out (a leak), the next two by BM25 remain
    assert prompt.startswith(
        "What does compiler optimisation mean?Making compiled code faster.\n\n"
    )
    assert prompt.count("\n\n") == 2 and prompt.endswith("What does compiler mean?")
    assert full == prompt + "Turns code into code.</s>"
    base_prompt, _ = plain.render("base", item, 0)
    assert base_prompt == "What does compiler mean?"


def test_rag_prompt_puts_retrieved_documents_before_the_question():
    plain = builder(SimpleNamespace(eos_token=""), chat=False, k=1, context_chars=30)
    item = EvalItem("What is a kernel?", "The core.", "h:2")
    prompt, _ = plain.render("rag", item, 0)
    assert prompt.startswith("Reference documents:\n\n[1] What does kernel mean?...\n\n")
    assert prompt.endswith("Use the documents where they help.\n\nWhat is a kernel?")
    assert plain.render("tuned+rag", item, 0)[0] == prompt


def test_random_few_shot_is_seeded_and_varies_by_question():
    plain = builder(SimpleNamespace(eos_token=""), chat=False, k=2, few_shot_choice="random")
    item = EvalItem("Q", "A", "h:3")
    assert plain.examples_for(item, 0) == plain.examples_for(item, 0)
    picks = {tuple(p.origin for p in plain.examples_for(item, i)) for i in range(10)}
    assert len(picks) > 1


def test_chat_few_shot_uses_turns_and_the_answer_is_closed_by_the_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = builder(tokenizer, chat=True, k=1)
    item = EvalItem("What is a byte?", "Eight bits.", "h:4")
    prompt, full = chat.render("few-shot", item, 0)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat does byte mean?<|im_end|>\n"
        "<|im_start|>assistant\nEight bits.<|im_end|>\n"
        "<|im_start|>user\nWhat is a byte?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert full == prompt + "Eight bits.<|im_end|>\n"
    continuation = EvalItem("one two", "three", "h:5", continuation=True)
    assert chat.render("base", continuation, 0) == ("one two", "one two three<|im_end|>")
    with pytest.raises(TunelabError, match="unknown system 'oracle'"):
        chat.render("oracle", item, 0)


def test_key_terms_prefer_braced_cross_references_then_rare_words():
    import math

    from tunelab.evaluation.run import key_terms

    raw = "A {compiler} that emits {machine code} and {Machine  code} again."
    assert key_terms(raw, "cleaned", {}, 1.0) == ["compiler", "machine code"]
    idf = {"kernel": math.log(100), "system": math.log(2), "operating": math.log(60)}
    # "system" is common in the training documents, "heart" never appears there (rarest)
    terms = key_terms(None, "The kernel: heart of the operating system", idf, math.log(50))
    assert terms == ["kernel", "heart", "operating"]


def test_a_plain_prompt_ending_in_a_space_is_rendered_as_training_tokenized_it():
    # training trains " Oslo" after "Answer:" (the space belongs to the answer's first token),
    # so generation continues "Answer:", and the scored text keeps the user's space
    plain = builder(SimpleNamespace(eos_token="</s>"), chat=False)
    prompt, full = plain.render("base", EvalItem("Capital of Norway? Answer: ", "Oslo", "h:9"), 0)
    assert prompt == "Capital of Norway? Answer:"
    assert full == "Capital of Norway? Answer: Oslo</s>"


def test_a_chat_with_tool_calls_is_not_reduced_to_a_question_and_answer():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
    chat = Example(
        "f:5",
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "4C"},
            {"role": "assistant", "content": "4 degrees."},
        ],
    )
    assert to_item(chat) is None  # "Weather?" -> "4 degrees." would drop the call and result


@pytest.mark.parametrize("adds_bos", [False, True])
def test_a_text_continuation_is_scored_as_training_tokenized_the_text(tiny_model_dir, adds_bos):
    # training renders a plain text as BOS + text + EOS for a Llama-2 style tokenizer; the
    # eval scored and generated its continuation without the BOS, a start the model never saw
    from tunelab.data.tokenize import tokenize_example
    from tunelab.evaluation.scoring import encode_scored
    from tunelab.models import load_tokenizer

    tokenizer = (
        bos_adding_tokenizer(tiny_model_dir) if adds_bos else load_tokenizer(str(tiny_model_dir))
    )
    example = Example("h:7", text="The kernel schedules every process on the machine.")
    item = to_item(example)
    trained = tokenize_example(example, tokenizer, 10_000, chat=False).input_ids
    for chat in (False, True):
        prompt, full = builder(tokenizer, chat=chat, k=1).render("base", item, 0)
        ids, first, _ = encode_scored(tokenizer, prompt, full, 10_000)
        assert ids == trained
        assert (ids[0] == tokenizer.bos_token_id) is adds_bos
        # the reference starts where the prompt's tokens end: "schedules ..." after "The kernel"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert first == len(prompt_ids) and ids[:first] == prompt_ids
    for system in ("few-shot", "rag"):
        prompt, _ = builder(tokenizer, chat=False, k=1).render(system, item, 0)
        assert prompt.startswith("<|im_start|>") is adds_bos


def test_a_plain_question_is_scored_as_training_tokenized_the_pair(tiny_model_dir):
    # a plain prompt/completion pair trains as BOS + prompt + completion + EOS for a tokenizer
    # that adds BOS (as TRL's does); the eval's prompt and scored text start the same way
    from tunelab.data.tokenize import tokenize_example
    from tunelab.evaluation.scoring import encode_scored

    tokenizer = bos_adding_tokenizer(tiny_model_dir)
    example = Example("h:3", prompt="What is a byte? ", completion="Eight bits of data.")
    item = to_item(example)
    trained = tokenize_example(example, tokenizer, 10_000, chat=False)
    prompt, full = builder(tokenizer, chat=False, k=1).render("base", item, 0)
    ids, _, _ = encode_scored(tokenizer, prompt, full, 10_000)
    assert ids == trained.input_ids and ids[0] == tokenizer.bos_token_id


def test_a_prompt_cut_to_fit_keeps_its_bos(tiny_model_dir):
    # a long few-shot or RAG prompt (or a forgetting passage) loses tokens from the left to fit
    # the scoring window; it lost its BOS with them, a start no training text had
    from tunelab.evaluation.scoring import encode_scored

    tokenizer = bos_adding_tokenizer(tiny_model_dir)
    example = Example("h:4", prompt="What is a byte? " * 20, completion="Eight bits of data.")
    prompt, full = builder(tokenizer, chat=False, k=1).render("base", to_item(example), 0)
    whole, first, cut = encode_scored(tokenizer, prompt, full, 10_000)
    ids, first_kept, cut = encode_scored(tokenizer, prompt, full, 30)
    assert cut and len(ids) == 30 and ids[0] == tokenizer.bos_token_id
    assert ids[1:] == whole[len(whole) - 29 :]  # the rest is the end of the text
    assert ids[first_kept:] == whole[first:]  # the reference whole, after the same prompt end
