"""The data stage counts the tokens training sees: one rendering path (BOS included), and
lengths keyed by content, not by the id() of examples that filters free."""

from __future__ import annotations

import pytest

from tests.conftest import bos_adding_tokenizer, write_jsonl
from tunelab.config import FineTuningConfig
from tunelab.data.prepare import prepare_examples, token_lengths
from tunelab.data.schema import Example
from tunelab.data.tokenize import bos_text, render_example, tokenize_example
from tunelab.errors import TunelabError
from tunelab.models import load_tokenizer

EXAMPLES = [
    Example("t:1", text="A byte is eight bits."),
    Example("t:2", prompt="What is a byte? ", completion="Eight bits."),
    Example(
        "t:3",
        messages=[
            {"role": "user", "content": "What is a kernel?"},
            {"role": "assistant", "content": "The core of an operating system."},
            {"role": "user", "content": "And a shell?"},
            {"role": "assistant", "content": "A program that runs commands."},
        ],
    ),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_dir):
    return bos_adding_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("chat_format", ["plain", "chat"])
@pytest.mark.parametrize("adds_bos", [False, True])
def test_counted_lengths_equal_the_tokens_training_sees(
    tokenizer, bos_tokenizer, chat_format, adds_bos
):
    tok = bos_tokenizer if adds_bos else tokenizer
    config = FineTuningConfig(chat_format=chat_format, system_prompt="Be brief.")
    chat = chat_format == "chat"
    trained = [
        len(tokenize_example(e, tok, 10_000, chat, config.system_prompt).input_ids)
        for e in EXAMPLES
    ]
    assert token_lengths(EXAMPLES, tok, config) == trained
    for example in EXAMPLES:
        spans_off = render_example(example, tok, chat, config.system_prompt, answer_spans=False)
        assert spans_off[0] == render_example(example, tok, chat, config.system_prompt)[0]


def test_a_plain_text_starts_with_bos_when_the_tokenizer_adds_it(tokenizer, bos_tokenizer):
    assert bos_text(tokenizer) == "" and bos_text(bos_tokenizer) == "<|im_start|>"
    config = FineTuningConfig(chat_format="plain")
    plain = token_lengths(EXAMPLES[:1], tokenizer, config)[0]
    with_bos = token_lengths(EXAMPLES[:1], bos_tokenizer, config)[0]
    assert with_bos == plain + 1
    ids = tokenize_example(EXAMPLES[0], bos_tokenizer, 64, chat=False).input_ids
    assert ids[0] == bos_tokenizer.bos_token_id and len(ids) == with_bos


def test_counting_refuses_chat_data_without_a_template_as_training_does(tokenizer):
    import copy

    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    config = FineTuningConfig(chat_format="auto")
    with pytest.raises(TunelabError, match="t:3: chat data needs a chat template"):
        tokenize_example(EXAMPLES[2], no_template, 64, chat=False)
    with pytest.raises(TunelabError, match="t:3: chat data needs a chat template"):
        token_lengths(EXAMPLES, no_template, config)


def test_lengths_stay_right_when_filtered_examples_are_freed(tmp_path, tokenizer):
    # max_tokens drops the long rows (freeing their Example objects); the counterfactual copies
    # made afterwards are new objects that can take a freed object's id(): keyed by id, they
    # were reported with the dropped row's length
    short = [{"text": f"he wrote code number {i}"} for i in range(60)]
    long = [{"text": f"document {i} " + "memory kernel stack compiler " * 30} for i in range(60)]
    rows = [row for pair in zip(long, short, strict=True) for row in pair]
    config = FineTuningConfig(
        dataset_path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
        data_cache=False,
        max_tokens=40,
        max_length=64,
        bias_mitigation="counterfactual",
        min_alpha_ratio=None,
        max_repeated_ngram_ratio=None,
        dedup_near_threshold=None,
    )
    prepared = prepare_examples(config, tokenizer)
    assert prepared.manifest["dropped"]["train"] == {"more than max_tokens": 60}
    assert len(prepared.train) == 120  # 60 short rows and their 60 counterfactual copies
    real = [len(tokenize_example(e, tokenizer, 10_000, False).input_ids) for e in prepared.train]
    stats = prepared.manifest["lengths"]["train"]["tokens"]
    assert stats["max"] == max(real) <= 40
    assert stats["mean"] == round(sum(real) / len(real), 1)
    assert prepared.manifest["lengths"]["train"]["truncated"] == 0


def test_a_plain_prompt_and_completion_start_with_bos_as_the_tokenizer_would(bos_tokenizer):
    # a Llama/Mistral/Gemma tokenizer puts BOS in front of any text it encodes (so TRL trains
    # plain pairs with it); tunelab trained them without, and generated their prompts without
    from tunelab.data.tokenize import render_prompt

    example = EXAMPLES[1]
    ids = tokenize_example(example, bos_tokenizer, 64, chat=False)
    whole = bos_tokenizer("What is a byte? Eight bits.", add_special_tokens=True)["input_ids"]
    assert ids.input_ids == whole + [bos_tokenizer.eos_token_id]
    answer = [i for i, label in zip(ids.input_ids, ids.labels, strict=True) if label != -100]
    assert bos_tokenizer.decode(answer).strip() == "Eight bits." + bos_tokenizer.eos_token
    # generation renders the prompt as the start of that training text
    prompt = render_prompt(bos_tokenizer, "What is a byte? ", chat=False)
    prompt_ids = bos_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert (
        prompt_ids[0] == bos_tokenizer.bos_token_id
        and ids.input_ids[: len(prompt_ids)] == prompt_ids
    )


def test_a_plain_preference_pair_starts_as_sft_renders_its_prompt(bos_tokenizer):
    from tunelab.data.preference import PreferenceExample, tokenize_preference
    from tunelab.data.tokenize import render_prompt

    pair = PreferenceExample("p:1", "What is a byte?", chosen=" Eight bits.", rejected=" A dog.")
    unit = tokenize_preference([pair], bos_tokenizer, 64, chat=False)[0]
    prompt = render_prompt(bos_tokenizer, "What is a byte?", chat=False)
    prompt_ids = bos_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for side in ("chosen", "rejected"):
        ids = unit.sides[side].input_ids
        assert ids[0] == bos_tokenizer.bos_token_id and ids[: len(prompt_ids)] == prompt_ids


def test_a_text_that_starts_with_its_bos_gets_no_second_one(bos_tokenizer):
    # a user's text or prompt written with its BOS ("<s>Hello", a copied Llama prompt) was
    # given another in front: two BOS tokens in training, generation, preference pairs and eval
    from tunelab.data.preference import PreferenceExample, tokenize_preference
    from tunelab.data.tokenize import render_prompt
    from tunelab.evaluation.systems import PromptBuilder, to_item

    bos, bos_id = bos_tokenizer.bos_token, bos_tokenizer.bos_token_id

    def ids(text):
        return bos_tokenizer(text, add_special_tokens=False)["input_ids"]

    for plain, written in (
        (
            Example("t:1", text="A byte is eight bits."),
            Example("t:1", text=bos + "A byte is eight bits."),
        ),
        (EXAMPLES[1], Example("t:2", prompt=bos + EXAMPLES[1].prompt, completion="Eight bits.")),
    ):
        once = tokenize_example(plain, bos_tokenizer, 64, chat=False).input_ids
        assert once[0] == bos_id and once[1] != bos_id
        assert tokenize_example(written, bos_tokenizer, 64, chat=False).input_ids == once
        assert token_lengths([written], bos_tokenizer, FineTuningConfig(chat_format="plain")) == [
            len(once)
        ]
    prompt = ids(render_prompt(bos_tokenizer, bos + "What is a byte? ", chat=False))
    assert prompt == ids(render_prompt(bos_tokenizer, "What is a byte? ", chat=False))
    assert prompt[:2] == [bos_id, ids("What")[0]]
    pair = PreferenceExample(
        "p:1", bos + "What is a byte?", chosen=" Eight bits.", rejected=" A dog."
    )
    unit = tokenize_preference([pair], bos_tokenizer, 64, chat=False)[0]
    assert [unit.sides[s].input_ids[:2] for s in ("chosen", "rejected")] == [prompt[:2]] * 2
    item = to_item(Example("h:1", prompt=bos + "What is a byte? ", completion="Eight bits."))
    builder = PromptBuilder(bos_tokenizer, False, None, [], retriever=None)
    shown, _ = builder.render("base", item, 0)
    assert ids(shown) == prompt


def test_the_cache_key_changes_when_the_tokenizer_is_edited_in_place(tiny_model_dir, tokenizer):
    # a tokenizer edited in its folder (BOS switched on or off, a new chat template) kept its
    # name and vocabulary size, the whole key: training reused tokens with the old BOS
    from tunelab.data.prepare import content_hash

    config = FineTuningConfig(dataset_path="d.jsonl")
    inputs = {"train": [{"sha256": "0", "path": "d.jsonl"}]}
    again = load_tokenizer(str(tiny_model_dir))
    assert content_hash(config, again, inputs) == content_hash(config, tokenizer, inputs)
    bos = bos_adding_tokenizer(tiny_model_dir)
    assert bos.name_or_path == tokenizer.name_or_path and len(bos) == len(tokenizer)
    assert content_hash(config, bos, inputs) != content_hash(config, tokenizer, inputs)
    again.chat_template = "{{ messages[0]['content'] }}"
    assert content_hash(config, again, inputs) != content_hash(config, tokenizer, inputs)
