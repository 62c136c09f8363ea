"""Schemas through the data stage's loader: each layout, and misspelt / wrong-typed columns."""

from __future__ import annotations

import pytest

from tunelab.data.schema import to_example
from tunelab.errors import TunelabError


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"text": "doc"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "do", "input": "x", "output": "y"}, "prompt_completion"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
            "messages",
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            "messages",
        ),
    ],
)
def test_each_schema_is_detected(row, kind):
    assert to_example(row, "f.jsonl:1").kind == kind


def test_template_maps_any_columns():
    example = to_example(
        {"term": "byte", "definition": "8 bits"},
        "f:1",
        prompt_template="What does {term} mean?",
        completion_template="{definition}",
    )
    assert (example.prompt, example.completion) == ("What does byte mean?", "8 bits")


def test_misspelt_column_is_named():
    with pytest.raises(TunelabError) as err:
        to_example({"promt": "a", "completion": "b"}, "f.jsonl:3")
    assert "f.jsonl:3" in str(err.value) and "'promt' looks like a misspelt 'prompt'" in str(
        err.value
    )
    with pytest.raises(
        TunelabError,
        match="f.jsonl:3: 'prompt' should be a string.*found missing. Did you mean 'promt'",
    ):
        to_example({"promt": "a", "completion": "b"}, "f.jsonl:3", schema="prompt_completion")


def test_wrong_type_is_named():
    with pytest.raises(
        TunelabError,
        match=r"f.jsonl:4: 'completion' should be a string \(the answer\), found int 3",
    ):
        to_example({"prompt": "a", "completion": 3}, "f.jsonl:4")


def test_a_kto_row_labelled_false_is_not_trained_as_an_answer(tmp_path):
    """A KTO file given to SFT (as dataset_path or a dataset_mix source) read its completions
    labelled false as answers to teach, the label dropped in silence."""
    from conftest import write_jsonl

    from tunelab.config import FineTuningConfig
    from tunelab.data.prepare import prepare_examples

    good = {"prompt": "What is a byte? ", "completion": "Eight bits.", "label": True}
    bad = {"prompt": "What is a byte? ", "completion": "A small dog.", "label": False}
    assert to_example(good, "f.jsonl:1").completion == "Eight bits."
    with pytest.raises(TunelabError, match=r"^f.jsonl:2: the row has 'label': false \(KTO"):
        to_example(bad, "f.jsonl:2")
    sft = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "What is RAM? ", "completion": "Memory."}]
    )
    kto = write_jsonl(tmp_path / "kto.jsonl", [good, bad])
    config = FineTuningConfig(dataset_path=str(sft), dataset_mix={str(kto): 0.3}, eval_split=0,
                              data_cache=False)  # fmt: skip
    with pytest.raises(TunelabError, match=r"kto.jsonl:2: the row has 'label': false"):
        prepare_examples(config)
