"""The SFT data keys reach preference data: near-dedup, quality filters, control characters
and read limits are applied to the pairs; keys that cannot act are refused or named."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from tunelab.config import FineTuningConfig, ineffective_settings
from tunelab.data.preference import format_preference_summary, prepare_preference
from tunelab.errors import TunelabError

ANSWER = "a program that translates the source code of a language into machine code for a cpu"


def _config(tmp_path, rows, **overrides) -> FineTuningConfig:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    values = dict(dataset_path=str(path), objective="dpo", output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return FineTuningConfig(**values)


def test_near_duplicate_pairs_are_dropped_and_reported(tmp_path):
    rows = [
        {"prompt": "What is a compiler?", "chosen": ANSWER, "rejected": "a kind of bread"},
        # the same pair with one word changed in the answer: a near duplicate
        {
            "prompt": "What is a compiler?",
            "chosen": ANSWER + " chip",
            "rejected": "a kind of bread",
        },
        {"prompt": "What is a byte?", "chosen": "eight bits of data", "rejected": "a dog"},
    ]
    prepared = prepare_preference(_config(tmp_path, rows))
    assert [e.origin.rsplit(":", 1)[1] for e in prepared.train] == ["1", "3"]
    manifest = prepared.manifest
    assert manifest["exact_duplicates_dropped"] == 0
    assert manifest["near_duplicates_dropped"] == 1
    assert manifest["near_duplicate_examples"][0].startswith(f"{tmp_path / 'pairs.jsonl'}:2 ~ ")
    assert "1 near duplicates dropped" in format_preference_summary(manifest)
    off = prepare_preference(_config(tmp_path, rows, dedup_near_threshold=None))
    assert len(off.train) == 3 and off.manifest["near_duplicates_dropped"] == 0


def test_one_chosen_answer_with_two_different_rejected_answers_keeps_both(tmp_path):
    rows = [
        {"prompt": "What is a compiler?", "chosen": ANSWER, "rejected": "a kind of bread"},
        {"prompt": "What is a compiler?", "chosen": ANSWER, "rejected": "a sleepy old cat"},
    ]
    prepared = prepare_preference(_config(tmp_path, rows))
    assert len(prepared.train) == 2 and prepared.manifest["near_duplicates_dropped"] == 0


def test_quality_filters_judge_the_taught_answer_not_the_rejected_one(tmp_path):
    loop = " ".join(["the"] * 90)
    rows = [
        {"prompt": "What is a compiler?", "chosen": ANSWER, "rejected": loop},  # kept
        {"prompt": "What is a loop?", "chosen": loop, "rejected": "code that repeats"},
        {"prompt": "What is a byte?", "chosen": "8 " * 40, "rejected": "eight bits"},
    ]
    prepared = prepare_preference(_config(tmp_path, rows))
    assert [e.prompt for e in prepared.train] == ["What is a compiler?"]
    assert prepared.manifest["quality_dropped"] == {
        "garbage: repeated n-grams": 1,
        "garbage: too few letters": 1,
    }
    summary = format_preference_summary(prepared.manifest)
    assert "2 failed the quality filters" in summary
    assert f"{tmp_path / 'pairs.jsonl'}:2 (garbage: repeated n-grams)" in summary


def test_max_chars_drop_leaves_nothing_and_says_so(tmp_path):
    rows = [{"prompt": "What is a compiler?", "chosen": ANSWER, "rejected": "bread"}]
    with pytest.raises(TunelabError, match="no preference rows left .* quality filters 1"):
        prepare_preference(_config(tmp_path, rows, max_chars=50))


def test_kto_bad_completions_are_not_quality_filtered(tmp_path):
    loop = " ".join(["the"] * 90)
    rows = [
        {"prompt": "What is a loop?", "completion": loop, "label": False},
        {"prompt": "What is a loop?", "completion": loop, "label": True},
        {"prompt": "What is a compiler?", "completion": ANSWER, "label": True},
    ]
    prepared = prepare_preference(_config(tmp_path, rows, objective="kto"))
    assert [(e.completion == loop, e.label) for e in prepared.train] == [
        (True, False),
        (False, True),
    ]


def test_control_characters_are_removed_from_pairs(tmp_path):
    rows = [{"prompt": "What is \x1b[31mRAM?", "chosen": "memory\x07", "rejected": "a sheep"}]
    prepared = prepare_preference(_config(tmp_path, rows))
    [example] = prepared.train
    assert (example.prompt, example.chosen) == ("What is RAM?", "memory")
    assert prepared.manifest["edited"]["control chars"] == 1
    kept = prepare_preference(
        _config(tmp_path, rows, drop_control_chars=False, max_nonprintable_ratio=None)
    )
    assert kept.train[0].chosen == "memory\x07"


def test_read_limits_apply_to_preference_files(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"answer {i}", "rejected": "no"} for i in range(5)]
    with pytest.raises(TunelabError, match="max_rows"):
        prepare_preference(_config(tmp_path, rows, max_rows=3))


@pytest.mark.parametrize("key", ["dataset_mix", "replay_general_share"])
def test_sft_text_mixing_is_refused_for_preference_objectives(tmp_path, key):
    value = {str(tmp_path / "forum.jsonl"): 0.2} if key == "dataset_mix" else 0.1
    with pytest.raises(TunelabError, match=f"'{key}' .* unset with objective dpo"):
        FineTuningConfig(objective="dpo", **{key: value})
    FineTuningConfig(objective="sft", **{key: value})  # still fine for SFT


def test_sft_only_data_keys_are_named_at_start(tmp_path):
    config = FineTuningConfig(objective="orpo", max_tokens=200, bias_mitigation="counterfactual")
    [warning] = [w for w in ineffective_settings(config) if "objective orpo" in w]
    assert "max_tokens (200)" in warning and "bias_mitigation ('counterfactual')" in warning
    assert not [w for w in ineffective_settings(FineTuningConfig(objective="dpo"))]
    sft = FineTuningConfig(max_tokens=200)
    assert not [w for w in ineffective_settings(sft) if "max_tokens" in w]


def test_summary_names_the_sft_only_cache_and_bias_report(tmp_path):
    rows = [{"prompt": "What is RAM?", "chosen": "memory", "rejected": "a sheep"}]
    summary = format_preference_summary(prepare_preference(_config(tmp_path, rows)).manifest)
    assert "note: data_cache and bias_report cover SFT data only" in summary
    quiet = prepare_preference(_config(tmp_path, rows, data_cache=False, bias_report=False))
    assert "note:" not in format_preference_summary(quiet.manifest)


def _kto_rows(true: int, false: int) -> list[dict]:
    return [
        {
            "prompt": f"What is term {i}?",
            "completion": f"answer number {i} for the term",
            "label": i < true,
        }
        for i in range(true + false)
    ]


def test_kto_warns_when_the_rows_are_all_one_label(tmp_path):
    config = _config(tmp_path, _kto_rows(6, 0), objective="kto", eval_split=0.0)
    summary = format_preference_summary(prepare_preference(config).manifest)
    assert "KTO rows: 6 desirable (true), 0 undesirable (false)." in summary
    assert "warning: all 6 KTO training rows are labelled true" in summary
    assert "Add rows labelled false, or train with objective: sft." in summary


def test_kto_warns_when_the_weights_leave_the_papers_range(tmp_path):
    # 2 desirable, 6 undesirable: 1.0 x 2 / (1.0 x 6) = 0.33; desirable_weight 3 to 4 fits
    config = _config(tmp_path, _kto_rows(2, 6), objective="kto", eval_split=0.0)
    summary = format_preference_summary(prepare_preference(config).manifest)
    assert "(undesirable_weight x 6 undesirable) = 0.33" in summary
    assert "Set desirable_weight between 3.00 and 4.00 (with undesirable_weight 1)." in summary
    manifest = prepare_preference(config).manifest
    assert "warning" not in format_preference_summary(manifest, (3.5, 1.0))
    assert "warning" not in format_preference_summary(manifest, (1.0, 0.0))  # unused class


def test_a_kto_csv_file_gives_its_labels_as_text(tmp_path):
    # a CSV or TSV file has no booleans: its KTO labels were refused ("'label' is 'true' (str),
    # expected a boolean. Write true ...") and, as SFT data, its false rows were taught
    from tunelab.data.prepare import prepare_examples

    data = tmp_path / "kto.csv"
    data.write_text(
        "prompt,completion,label\nWhat is a cache?,a fast store of data,true\n"
        "What is a bus?,a yellow vehicle,FALSE\nWhat is a loop?,code that repeats, True\n",
        encoding="utf-8",
    )
    config = FineTuningConfig(dataset_path=str(data), objective="kto", eval_split=0.0)
    prepared = prepare_preference(config)
    assert [e.label for e in prepared.train] == [True, False, True]
    assert "KTO rows: 2 desirable (true), 1 undesirable (false)." in format_preference_summary(
        prepared.manifest
    )
    with pytest.raises(TunelabError, match=r"kto.csv:3: the row has 'label': false"):
        prepare_examples(FineTuningConfig(dataset_path=str(data), data_cache=False))
