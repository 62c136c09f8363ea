"""The whole stage: counted steps, tokens, splits, leakage, mitigation, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunelab.config import FineTuningConfig
from tunelab.data.prepare import format_summary, prepare_examples, write_prepared
from tunelab.errors import TunelabError
from tunelab.models import load_tokenizer

EXAMPLE_DATA = Path(__file__).parents[2] / "examples" / "computing-terms" / "data"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def rows():
    good = [
        {"prompt": f"What is item {i}?", "completion": f"Item {i} is a thing number {i}."}
        for i in range(20)
    ]
    return good + [
        {
            "prompt": "What is item 3?",
            "completion": "Item 3 is a thing number 3.",
        },  # exact duplicate
        {
            "prompt": "WHAT is item 4 ?",
            "completion": "item 4 is a   thing number 4",
        },  # exact after normalising
        {"prompt": "Contact?", "completion": "Mail <b>bob@example.com</b> or call 555-123-4567."},
        {"prompt": "Empty?", "completion": "   "},
        {"prompt": "Binary?", "completion": "\x00\x01\x02\x03 junk \x04\x05"},
    ]


def config_for(path, **settings):
    values = dict(dataset_path=str(path), data_cache=False)
    values.update(settings)
    return FineTuningConfig(**values)


def test_every_drop_is_counted_by_reason(tmp_path):
    prepared = prepare_examples(config_for(write_jsonl(tmp_path / "d.jsonl", rows())))
    m = prepared.manifest
    assert m["counts"]["train_loaded"] == 25 and m["counts"]["train"] == len(prepared.train) == 21
    assert m["dropped"]["train"] == {
        "exact duplicate": 2,
        "empty": 1,
        "garbage: non-printable characters": 1,
    }
    contact = next(e for e in prepared.train if e.prompt == "Contact?")
    assert contact.completion == "Mail [EMAIL] or call [PHONE]."
    assert m["pii"]["train"] == {"email": 1, "phone": 1}
    steps = {s["step"]: s for s in m["steps"]}
    assert steps["html"]["changed"] == 1 and steps["whitespace"]["changed"] == 2
    assert steps["exact dedup"]["examples"][0]["origin"].endswith("d.jsonl:21")
    summary = format_summary(m)
    assert "25 rows loaded -> 21 training examples" in summary
    assert "2 exact duplicate" in summary and "1 email" in summary


def test_tokens_filter_and_truncation(tmp_path, tokenizer):
    data = [
        {"text": "short"},
        {"text": "a much longer document " * 20},
        {"text": "medium sized text here"},
    ]
    config = config_for(
        write_jsonl(tmp_path / "d.jsonl", data),
        max_length=16,
        max_tokens=60,
        min_alpha_ratio=None,
        max_repeated_ngram_ratio=None,
    )
    prepared = prepare_examples(config, tokenizer)
    lengths = prepared.manifest["lengths"]["train"]
    assert prepared.manifest["dropped"]["train"] == {"more than max_tokens": 1}
    assert lengths["tokens"]["count"] == 2 and lengths["max_length"] == 16
    from tunelab.data.tokenize import tokenize_example

    real = [len(tokenize_example(e, tokenizer, 10_000, False).input_ids) for e in prepared.train]
    assert lengths["tokens"]["max"] == max(real) and lengths["truncated"] == sum(
        n > 16 for n in real
    )


def test_seeded_split_is_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows()[:20])
    first = prepare_examples(config_for(path, eval_split=0.25, seed=7))
    again = prepare_examples(config_for(path, eval_split=0.25, seed=7))
    other = prepare_examples(config_for(path, eval_split=0.25, seed=8))
    assert len(first.eval) == 5 and len(first.train) == 15
    assert [e.origin for e in first.eval] == [e.origin for e in again.eval]
    assert [e.origin for e in first.eval] != [e.origin for e in other.eval]
    assert not {e.origin for e in first.eval} & {e.origin for e in first.train}


def test_leakage_reported_and_optionally_dropped(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", rows()[:20])
    held = write_jsonl(
        tmp_path / "e.jsonl",
        [
            rows()[2],
            {"prompt": "What is item 5 ?", "completion": "Item 5 is a thing number 5!"},
            {"prompt": "New?", "completion": "Something else entirely."},
        ],
    )
    kept = prepare_examples(config_for(train, eval_path=str(held)))
    assert kept.manifest["leakage"]["exact"] == 2 and kept.manifest["leakage"]["dropped"] == 0
    assert len(kept.train) == 20 and len(kept.eval) == 3
    dropped = prepare_examples(config_for(train, eval_path=str(held), drop_eval_leaks=True))
    assert len(dropped.train) == 18 and dropped.manifest["dropped"]["train"] == {
        "leaked into eval": 2
    }


def test_bias_mitigation_before_after(tmp_path):
    data = [
        {"text": "He wrote the compiler."},
        {"text": "He fixed the kernel bug."},
        {"text": "She tested it."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", data)
    prepared = prepare_examples(config_for(path, bias_mitigation="counterfactual"))
    section = prepared.manifest["bias"]
    assert section["before"]["dimensions"]["gender"]["mentions"] == {"female": 1, "male": 2}
    assert section["after"]["dimensions"]["gender"]["mentions"] == {"female": 3, "male": 3}
    assert section["added"] == 3 and len(prepared.train) == 6
    rebalanced = prepare_examples(config_for(path, bias_mitigation="rebalance"))
    assert rebalanced.manifest["bias"]["after"]["dimensions"]["gender"]["examples"] == {
        "female": 2,
        "male": 2,
    }


def test_cache_hit_skips_cleaning(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    first = prepare_examples(config_for(path, data_cache=True))
    assert first.manifest["cache_hit"] is False
    import tunelab.data.prepare as stage

    monkeypatch.setattr(stage, "_prepare", lambda *a: pytest.fail("cleaned again"))
    second = prepare_examples(config_for(path, data_cache=True))
    assert second.manifest["cache_hit"] is True and "from cache" in format_summary(second.manifest)
    assert second.manifest["content_hash"] == first.manifest["content_hash"]
    assert [e.to_row() for e in second.train] == [e.to_row() for e in first.train]
    # a changed setting or input is a different key
    assert prepare_examples.__module__  # (the lambda above would fail on a miss)
    monkeypatch.undo()
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    changed = prepare_examples(config_for(path, data_cache=True, min_chars=5))
    assert (
        changed.manifest["cache_hit"] is False
        and changed.manifest["content_hash"] != first.manifest["content_hash"]
    )


def test_the_same_bytes_under_another_name_are_reported_under_that_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    first = write_jsonl(tmp_path / "d.jsonl", rows())
    prepare_examples(config_for(first, data_cache=True))
    (tmp_path / "other").mkdir()
    renamed = tmp_path / "other" / "renamed.jsonl"
    renamed.write_bytes(Path(first).read_bytes())
    again = prepare_examples(config_for(renamed, data_cache=True))
    # previews and row errors name the file the user passed, never a cached one's name
    assert all(e.origin.startswith(str(renamed)) for e in again.train), again.train[0].origin


def test_empty_after_filtering_names_steps(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "ab"}, {"text": "hello world"}, {"text": "hello world"}]
    )
    held = write_jsonl(tmp_path / "e.jsonl", [{"text": "Hello, world!"}])
    with pytest.raises(TunelabError) as err:
        prepare_examples(config_for(path, min_chars=5, eval_path=str(held), drop_eval_leaks=True))
    message = str(err.value)
    assert str(path) in message and "no train examples left after filtering (3 loaded" in message
    assert (
        "'shorter than min_chars' removed 1" in message and "'exact duplicate' removed 1" in message
    )
    assert "'leaked into eval' removed 1" in message and "Loosen" in message


def test_foldoc_subset_with_template(tmp_path, tokenizer):
    config = config_for(
        EXAMPLE_DATA / "train.jsonl",
        eval_path=str(EXAMPLE_DATA / "heldout.jsonl"),
        prompt_template="What does {term} mean?",
        completion_template="{definition}",
        clean_rules=["foldoc"],
        max_length=128,
    )
    prepared = prepare_examples(config, tokenizer)
    assert prepared.manifest["counts"]["train_loaded"] == 1200 and len(prepared.eval) == 200
    completions = [e.completion for e in prepared.train]
    assert sum("{" in c for c in completions) <= 3  # only FOLDOC's own broken markup and code
    assert not any(c.rstrip().endswith(")") and c.rstrip()[-11:-7].isdigit() for c in completions)
    assert not any("[{Jargon File}]" in c or c.startswith("<") for c in completions)
    assert prepared.manifest["lengths"]["train"]["truncation_rate"] > 0
    written = write_prepared(prepared, tmp_path / "out")
    first = json.loads(written[0].read_text().splitlines()[0])
    assert set(first) == {"prompt", "completion"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["train"][0]["sha256"] and manifest["settings"]["clean_rules"] == [
        "foldoc"
    ]
