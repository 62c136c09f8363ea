"""Preference rows in TRL's formats: accepted forms, and one clear line per bad row."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from tunelab.config import FineTuningConfig
from tunelab.data.preference import parse_row, prepare_preference, tokenize_preference
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import TunelabError


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def test_plain_row_with_prompt():
    [example] = parse_row({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "f:1", "dpo")
    assert (example.prompt, example.chosen, example.rejected) == ("Q?", "good", "bad")


def test_implicit_prompt_is_the_shared_start_of_the_conversations():
    row = {
        "chosen": [_user("hi"), _bot("hello"), _user("what is RAM?"), _bot("memory")],
        "rejected": [_user("hi"), _bot("hello"), _user("what is RAM?"), _bot("a sheep")],
    }
    [example] = parse_row(row, "f:3", "dpo")
    assert example.prompt == [_user("hi"), _bot("hello"), _user("what is RAM?")]
    assert example.chosen == [_bot("memory")] and example.rejected == [_bot("a sheep")]


def test_paired_rows_become_two_unpaired_ones_for_kto():
    good, bad = parse_row({"prompt": "Q", "chosen": "a", "rejected": "b"}, "f:1", "kto")
    assert (good.completion, good.label, bad.completion, bad.label) == ("a", True, "b", False)


@pytest.mark.parametrize(
    ("row", "objective", "message"),
    [
        ({"prompt": "Q", "chosen": "a"}, "dpo", "f.jsonl:7: the 'rejected' answer is missing"),
        ({"prompt": "Q", "chosen": "", "rejected": "b"}, "dpo", "'chosen' answer is missing or"),
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "dpo", "are identical"),
        ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "dpo", "'chosen' is int (3), expected"),
        (
            {"chosen": [_user("a"), _bot("x")], "rejected": [_user("b"), _bot("y")]},
            "dpo",
            "(prompt not shared)",
        ),
        ({"chosen": "a", "rejected": "b"}, "dpo", "without a 'prompt' column"),
        (
            {"prompt": [_user("Q")], "chosen": "a", "rejected": "b"},
            "dpo",
            "'prompt' and the answers differ in type",
        ),
        ({"prompt": "Q", "completion": "a", "label": "yes"}, "kto", "'label' is 'yes' (str)"),
        ({"prompt": "Q", "completion": "a", "label": 1}, "kto", "expected a boolean"),
        ({"prompt": "Q", "completion": "a"}, "kto", "'label' is missing"),
        ({"prompt": "Q", "completion": "a", "label": True}, "dpo", "use objective: kto"),
        ({"text": "hello"}, "dpo", "expected 'chosen' and 'rejected' columns"),
    ],
)
def test_each_bad_row_gets_one_line_naming_it(row, objective, message):
    with pytest.raises(TunelabError) as caught:
        parse_row(row, "f.jsonl:7", objective)
    text = str(caught.value)
    assert text.startswith("f.jsonl:7: ") and "\n" not in text
    assert message.lower() in text.lower()


def test_prepare_cleans_dedups_and_reports_leakage(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": "What is <b>RAM</b>?", "chosen": "memory", "rejected": "a sheep"},
        {"prompt": "What is <b>RAM</b>?", "chosen": "memory", "rejected": "a sheep"},
        {"prompt": "What is a CPU?", "chosen": "a processor", "rejected": "a cat"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [rows[2]])
    config = FineTuningConfig(
        model_name=str(tiny_model_dir), dataset_path=str(train), eval_path=str(held_out),
        objective="dpo", drop_eval_leaks=True,
    )  # fmt: skip
    prepared = prepare_preference(config)
    assert [e.prompt for e in prepared.train] == ["What is RAM?"]  # HTML stripped
    manifest = prepared.manifest
    assert manifest["exact_duplicates_dropped"] == 1
    assert manifest["leakage"] == {
        "prompts_in_eval": 1, "dropped": 1, "examples": [f"{train}:3"],
    }  # fmt: skip
    assert manifest["edited"]["html"] == 2


def test_whitespace_folding_keeps_the_text_a_plain_pair_is_joined_by(tmp_path, tiny_model_dir):
    """A plain prompt is joined to its answer as it stands: folding may shrink runs of spaces
    and blank lines but must keep the prompt's trailing newline and an answer's leading space,
    or training sees "mean?A bus ..." where the user (and an evaluation) has "mean?\\nA bus".
    Conversation turns are rendered by the template, so their edges are stripped as in SFT."""
    rows = [
        {"prompt": "What does   bus mean?\n\n\n", "chosen": " wires  that carry data",
         "rejected": " a yellow vehicle\n"},
        {"prompt": [_user("  RAM? ")], "chosen": [_bot(" memory ")], "rejected": [_bot("sheep")]},
    ]  # fmt: skip
    config = FineTuningConfig(
        model_name=str(tiny_model_dir), objective="dpo",
        dataset_path=str(write_jsonl(tmp_path / "pairs.jsonl", rows)),
    )  # fmt: skip
    plain, chat = prepare_preference(config).train
    assert (plain.prompt, plain.chosen, plain.rejected) == (
        "What does bus mean?\n",
        " wires that carry data",
        " a yellow vehicle\n",
    )
    assert (chat.prompt, chat.chosen) == ([_user("RAM?")], [_bot("memory")])


def test_bad_row_in_a_file_names_file_and_line(tmp_path, tiny_model_dir):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = FineTuningConfig(model_name=str(tiny_model_dir), dataset_path=str(path),
                              objective="dpo")  # fmt: skip
    with pytest.raises(TunelabError, match=r"pairs.jsonl:2: the 'rejected' answer is missing"):
        prepare_preference(config)


def test_only_the_answer_turn_is_scored_in_a_conversation(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {
        "chosen": [_user("hi"), _bot("hello"), _user("RAM?"), _bot("memory")],
        "rejected": [_user("hi"), _bot("hello"), _user("RAM?"), _bot("sheep")],
    }
    [unit] = tokenize_preference(parse_row(row, "f:1", "dpo"), tokenizer, 128, chat=True)
    chosen = unit.sides["chosen"]
    scored = tokenizer.decode([t for t in chosen.labels if t != IGNORE_INDEX])
    assert scored.startswith("memory") and "hello" not in scored


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q", "chosen": "   ", "rejected": "b"}, "'chosen' answer is empty or only"),
        (
            {"prompt": [_user("Q")], "chosen": [_bot("")], "rejected": [_bot("b")]},
            "'chosen' answer is empty or only whitespace",
        ),
        (
            {"prompt": [_user("Q")], "chosen": [_bot("a")], "rejected": [_bot(" \n")]},
            "'rejected' answer is empty or only whitespace",
        ),
    ],
)
def test_a_blank_answer_is_refused_by_row(row, message):
    """A whitespace-only answer passed the emptiness check and trained as an empty answer."""
    with pytest.raises(TunelabError, match="^f.jsonl:7: ") as caught:
        parse_row(row, "f.jsonl:7", "dpo")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("row", "objective", "message"),
    [
        (
            {"prompt": "Q ", "chosen": "same  answer", "rejected": "same answer"},
            "dpo",
            ":2: 'chosen' and 'rejected' are identical after cleaning (whitespace)",
        ),
        (
            {"prompt": "Q ", "chosen": "<b>same</b> answer", "rejected": "same answer"},
            "ipo",
            ":2: 'chosen' and 'rejected' are identical after cleaning (html)",
        ),
        (
            {"prompt": "Q ", "chosen": "<p></p>", "rejected": "a bad answer"},
            "dpo",
            ":2: the 'chosen' answer is empty after cleaning (html, whitespace)",
        ),
        (
            {"prompt": "Q ", "completion": "<br>", "label": True},
            "kto",
            ":2: the 'completion' answer is empty after cleaning (html",
        ),
    ],
)
def test_a_pair_that_cleaning_empties_or_makes_equal_is_refused(tmp_path, row, objective,
                                                                message):  # fmt: skip
    """The row checks ran on the raw row only: cleaning could leave an empty answer or two
    equal ones, which trained silently (a pair with nothing to prefer)."""
    good = {"prompt": "What is x? ", "chosen": "a good answer", "rejected": "a bad answer"}
    if objective == "kto":
        good = {"prompt": "What is x? ", "completion": "a good answer", "label": False}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    config = FineTuningConfig(dataset_path=str(path), objective=objective, eval_split=0)
    with pytest.raises(TunelabError) as caught:
        prepare_preference(config)
    assert str(caught.value).startswith(f"{path}{message}") and "\n" not in str(caught.value)
