import copy

import pytest

from tunelab.data.schema import Example, to_example
from tunelab.data.tokenize import (
    IGNORE_INDEX,
    render_prompt,
    tokenize_example,
    uses_chat_template,
)
from tunelab.errors import TunelabError
from tunelab.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def loss_text(tokenizer, tokenized):
    return tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX])


def test_pad_token_added_as_eos_and_eos_stays_in_the_labels(tokenizer):
    # the fixture tokenizer has no pad token: tunelab pads with EOS ...
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    out = tokenize_example(
        Example("x", prompt="What is a byte?", completion="Eight bits."), tokenizer, 64, chat=False
    )
    # ... and the EOS token is still a target, so the tuned model learns to stop
    assert out.labels[-1] == tokenizer.eos_token_id == out.input_ids[-1]
    assert loss_text(tokenizer, out) == "Eight bits.<|im_end|>"


def test_plain_text_is_all_loss(tokenizer):
    out = tokenize_example(Example("x", text="A byte is eight bits."), tokenizer, 64, chat=True)
    assert out.labels == out.input_ids
    assert tokenizer.decode(out.input_ids) == "A byte is eight bits.<|im_end|>"


def test_chat_rendering_masks_everything_but_the_answers(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "A byte."},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "Bits."},
    ]
    out = tokenize_example(Example("x", messages=messages), tokenizer, 128, chat=False)
    assert loss_text(tokenizer, out) == "A byte.<|im_end|>\nBits.<|im_end|>\n"
    assert tokenizer.decode(out.input_ids).startswith("<|im_start|>user\nhi<|im_end|>")


def test_prompt_completion_in_chat_format_with_system_prompt(tokenizer):
    out = tokenize_example(
        Example("x", prompt="What is TCP?", completion="A protocol."),
        tokenizer,
        128,
        chat=True,
        system_prompt="Be brief.",
    )
    text = tokenizer.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is")
    assert loss_text(tokenizer, out) == "A protocol.<|im_end|>\n"


def test_truncation_is_reported(tokenizer):
    out = tokenize_example(Example("x", text="byte " * 100), tokenizer, 16, chat=False)
    assert out.truncated and len(out.input_ids) == 16


def test_chat_format_without_template_is_an_error(tokenizer):
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        assert uses_chat_template(tokenizer, "auto") is False
        with pytest.raises(TunelabError, match="chat_format is 'chat' but the tokenizer has no"):
            uses_chat_template(tokenizer, "chat")
        with pytest.raises(TunelabError, match="chat data needs a chat template"):
            tokenize_example(
                Example(
                    "f.jsonl:3",
                    messages=[
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                    ],
                ),
                tokenizer,
                32,
                chat=False,
            )
    finally:
        tokenizer.chat_template = template


# --- the prompt/answer boundary: a token holding answer characters is trained ---------------
# The tiny tokenizer (byte-level BPE) merges a space with the word after it, as SmolLM's does:
# "Define: " + "byte" is tokenized ..., ":", " byte".

SPACE_CHAT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + "
    "message['content'] + '\n' }}{% else %}{{ 'Assistant: ' + message['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}"
    "{% endif %}"
)


def first_loss_token(tokenizer, tokenized):
    index = next(i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX)
    return tokenizer.decode(tokenized.input_ids[index])


def test_a_prompt_ending_in_a_space_trains_the_answers_first_word(tokenizer):
    out = tokenize_example(
        Example("x", prompt="Define: ", completion="byte"), tokenizer, 64, chat=False
    )
    assert first_loss_token(tokenizer, out) == " byte"
    assert loss_text(tokenizer, out) == " byte<|im_end|>"
    # inference renders the prompt as training tokenized it: without the merged space
    prompt_ids = tokenizer(render_prompt(tokenizer, "Define: ", chat=False))["input_ids"]
    assert out.input_ids[: len(prompt_ids)] == prompt_ids
    assert out.labels[len(prompt_ids)] == out.input_ids[len(prompt_ids)]


@pytest.mark.parametrize(
    ("row", "templates"),
    [
        ({"instruction": "Define: ", "output": "byte"}, {}),
        (
            {"term": "kernel", "definition": "byte"},
            {"prompt_template": "Define {term}: ", "completion_template": "{definition}"},
        ),
    ],
    ids=["instruction", "prompt_template"],
)
def test_every_prompt_completion_schema_trains_the_boundary_token(tokenizer, row, templates):
    example = to_example(row, "data.jsonl:1", **templates)
    out = tokenize_example(example, tokenizer, 64, chat=False)
    assert loss_text(tokenizer, out) == " byte<|im_end|>"


def test_a_chat_template_whose_answer_follows_a_space_trains_the_first_word(tokenizer):
    spaced = copy.deepcopy(tokenizer)
    spaced.chat_template = SPACE_CHAT
    messages = [{"role": "user", "content": "Define it"}, {"role": "assistant", "content": "byte"}]
    out = tokenize_example(Example("x", messages=messages), spaced, 64, chat=True)
    assert loss_text(spaced, out) == " byte<|im_end|>\n"
    pair = tokenize_example(
        Example("x", prompt="Define it", completion="byte"), spaced, 64, chat=True
    )
    assert loss_text(spaced, pair) == " byte<|im_end|>\n"


def test_reference_scoring_counts_the_boundary_token(tokenizer):
    from tunelab.evaluation.scoring import encode_scored

    ids, first, _ = encode_scored(tokenizer, "Define: ", "Define: byte<|im_end|>", 64)
    assert tokenizer.decode(ids[first:]) == " byte<|im_end|>"
