"""Chats with OpenAI-style tool calls, and empty assistant turns: what is trained is exactly
what the user marked as the answer, or the row is refused by name."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import write_jsonl
from tunelab.config import FineTuningConfig
from tunelab.data.prepare import format_summary, prepare_examples
from tunelab.data.schema import to_example
from tunelab.data.tokenize import IGNORE_INDEX, tokenize_example
from tunelab.errors import TunelabError
from tunelab.models import load_tokenizer

# a ChatML template that writes the tools and the calls, as Qwen2.5's does
TOOL_CHATML = (
    "{% if tools %}<|im_start|>system\nTools:{% for tool in tools %} {{ tool['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}{% for message in messages %}{{ '<|im_start|>' + "
    "message['role'] + '\n' + message['content'] }}{% for call in message.get('tool_calls', []) %}"
    "<tool_call>{{ call['function']['name'] }} {{ call['function']['arguments'] | tojson }}"
    "</tool_call>{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def tool_chat(content=""):
    return [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": content, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 4}'},
        {"role": "assistant", "content": "It is 4 degrees."},
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tool_tokenizer(tokenizer):
    tools = copy.deepcopy(tokenizer)
    tools.chat_template = TOOL_CHATML
    return tools


def loss_text(tokenizer, tokenized):
    return tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("content", ["", None])
def test_a_tool_call_is_rendered_with_the_tools_and_trained(tool_tokenizer, content):
    example = to_example({"messages": tool_chat(content), "tools": TOOLS}, "d.jsonl:1")
    call = example.messages[1]
    assert call["content"] == "" and call["tool_calls"][0]["function"]["arguments"] == {
        "city": "Oslo"
    }  # the JSON string of arguments becomes the mapping chat templates expect
    assert example.messages[2]["tool_call_id"] == "c1"
    out = tokenize_example(example, tool_tokenizer, 256, chat=True)
    text = tool_tokenizer.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\nTools: get_weather<|im_end|>")
    assert loss_text(tool_tokenizer, out) == (
        '<tool_call>get_weather {"city": "Oslo"}</tool_call><|im_end|>\n'
        "It is 4 degrees.<|im_end|>\n"
    )


def test_a_template_that_drops_tool_calls_is_refused_by_name(tokenizer):
    example = to_example({"messages": tool_chat()}, "d.jsonl:3")
    with pytest.raises(TunelabError) as error:
        tokenize_example(example, tokenizer, 256, chat=True)
    message = str(error.value)
    assert message.startswith("d.jsonl:3: assistant message 1 has tool_calls, which the model's")
    assert "'get_weather'" in message and "chat template supports tools" in message


def test_tool_call_rows_that_cannot_be_right_name_the_problem():
    def error(messages, **row):
        with pytest.raises(TunelabError) as caught:
            to_example({"messages": messages, **row}, "d.jsonl:2")
        return str(caught.value)

    null = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    assert "should be a string, found NoneType (null is allowed only with tool_calls)" in error(
        null
    )
    user_call = [{"role": "user", "content": "", "tool_calls": [CALL]}, tool_chat()[3]]
    assert "user message with tool_calls; only an assistant" in error(user_call)
    bad = copy.deepcopy(tool_chat())
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{city: Oslo"
    assert "messages[1].tool_calls[0].function.arguments is not valid JSON" in error(bad)
    assert "'tools' should be a list of function schemas" in error(tool_chat(), tools={"a": 1})
    parsed = to_example({"messages": tool_chat(), "tools": '[{"type": "function"}]'}, "x")
    assert parsed.tools == [{"type": "function"}]  # a JSON string column, as some datasets do


def test_an_empty_assistant_turn_mid_chat_is_not_trained_and_is_counted(tmp_path, tokenizer):
    chat = [
        {"role": "user", "content": "What is a byte?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Well?"},
        {"role": "assistant", "content": "Eight bits."},
    ]
    out = tokenize_example(to_example({"messages": chat}, "d.jsonl:1"), tokenizer, 128, chat=True)
    assert loss_text(tokenizer, out) == "Eight bits.<|im_end|>\n"
    empty_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": chat}, {"messages": empty_only}, {"prompt": "Hi?", "completion": ""}],
    )
    config = FineTuningConfig(dataset_path=str(path), data_cache=False)
    manifest = prepare_examples(config, tokenizer).manifest
    # a chat with no answer is dropped as 'empty', as an empty completion is
    assert manifest["dropped"]["train"] == {"empty": 2}
    summary = format_summary(manifest)
    assert "1 empty assistant turns left out of the loss" in summary
    step = next(s for s in manifest["steps"] if s["step"] == "empty turns")
    assert step["masked"] == 1 and step["examples"][0]["reason"] == "empty assistant turn(s) 1"


def test_tools_survive_the_data_cache(tmp_path, tool_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": tool_chat(), "tools": TOOLS}])
    config = FineTuningConfig(dataset_path=str(path))
    first = prepare_examples(config).train[0]
    second = prepare_examples(config)
    assert second.manifest["cache_hit"] and second.train[0].tools == first.tools == TOOLS
    assert second.train[0].messages[1]["tool_calls"] == first.messages[1]["tool_calls"]


def test_data_inspect_refuses_tool_calls_the_template_drops(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": tool_chat()}])
    config = FineTuningConfig(dataset_path=str(path), data_cache=False)
    with pytest.raises(TunelabError, match=r"d.jsonl:1: assistant message 1 has tool_calls"):
        prepare_examples(config, tokenizer)  # what data inspect runs with a tokenizer
