"""Weighted mixing of training sources and general-text replay: proportions, report, checks."""

from __future__ import annotations

import pytest
import yaml
from conftest import write_jsonl

from tunelab.data.mixing import GENERAL, check_mix, mix_training_data, replay_passages
from tunelab.data.schema import Example
from tunelab.errors import TunelabError


def examples(prefix: str, count: int) -> list[Example]:
    return [
        Example(origin=f"{prefix}:{i}", prompt=f"{prefix} {i}?", completion=f"{prefix} answer {i}")
        for i in range(count)
    ]


def test_weights_are_shares_of_the_final_training_set():
    primary, forum = examples("main", 30), examples("forum", 40)
    mixed, report = mix_training_data(primary, [("forum.jsonl", 0.25, forum)], 0.25, seed=3)
    # dataset_path keeps 1 - 0.25 - 0.25 = 0.5 and is used whole: 30 / 0.5 = 60 in all
    assert len(mixed) == 60
    origins = [e.origin.split(":")[0] for e in mixed]
    assert origins.count("main") == 30 and origins.count("forum") == 15
    general = [e for e in mixed if e.text is not None]
    assert len(general) == 15
    rows = {row["path"]: row for row in report["sources"]}
    assert rows["dataset_path"]["share"] == 0.5 and rows["forum.jsonl"]["share"] == 0.25
    assert rows[GENERAL]["share"] == 0.25
    passages = replay_passages()
    assert rows[GENERAL]["available"] == len(passages)
    assert rows[GENERAL]["repeated"] == max(15 - len(passages), 0)
    assert rows["forum.jsonl"]["repeated"] == 0
    # the forum sample is drawn without repetition; every main example is kept once
    assert len({e.origin for e in mixed if e.origin.startswith("forum")}) == 15
    assert sorted(e.origin for e in mixed if e.origin.startswith("main")) == sorted(
        e.origin for e in primary
    )
    # the same seed gives the same mix
    again, _ = mix_training_data(primary, [("forum.jsonl", 0.25, forum)], 0.25, seed=3)
    assert [e.origin for e in again] == [e.origin for e in mixed]


def test_a_small_source_is_repeated_whole_before_sampling():
    mixed, report = mix_training_data(examples("main", 10), [("s", 0.5, examples("s", 3))], 0, 0)
    drawn = [e.origin for e in mixed if e.origin.startswith("s:")]
    assert len(drawn) == 10 and all(drawn.count(f"s:{i}") >= 3 for i in range(3))
    assert report["sources"][1]["repeated"] == 7


def test_replay_never_trains_on_the_passages_the_forgetting_check_reads():
    from tunelab.evaluation.forgetting import general_passages

    every = general_passages()
    assert set(replay_passages()).isdisjoint(every[1::2])
    assert len(replay_passages()) + len(every[1::2]) == len(every)


def test_mix_settings_are_checked():
    assert check_mix({"a.jsonl": 0.2}, 0.1) == [("a.jsonl", 0.2)]
    with pytest.raises(TunelabError, match="'dataset_mix': a.jsonl has weight 1.5"):
        check_mix({"a.jsonl": 1.5}, 0.0)
    with pytest.raises(TunelabError, match="add up to 1.00; they must leave dataset_path"):
        check_mix({"a.jsonl": 0.6}, 0.4)
    with pytest.raises(TunelabError, match="'replay_general_share' is -0.1"):
        check_mix({}, -0.1)


def test_prepare_mixes_sources_after_the_hold_out_and_reports_the_mix(tmp_path):
    from tunelab.config import load_config
    from tunelab.data.prepare import prepare_examples
    from tunelab.data.store import format_summary

    rows = [
        {"prompt": f"What is item {i}?", "completion": f"Item {i} is thing {i}."} for i in range(20)
    ]
    write_jsonl(tmp_path / "main.jsonl", rows)
    leak = {"prompt": "What is the held-out item?", "completion": "It is only in eval."}
    extra = [{"prompt": f"Extra {i}?", "completion": f"Extra answer {i}."} for i in range(4)]
    write_jsonl(tmp_path / "more" / "extra.jsonl", extra + [leak])  # the eval item, not in main
    write_jsonl(tmp_path / "eval.jsonl", [leak])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "dataset_path": "main.jsonl", "eval_path": "eval.jsonl",
        "dataset_mix": {"more/extra.jsonl": 0.2}, "replay_general_share": 0.2,
        "data_cache": False, "bias_report": False, "dedup_exact": False,
    }))  # fmt: skip
    config = load_config(tmp_path / "run.yaml")
    assert list(config.dataset_mix) == [str(tmp_path / "more" / "extra.jsonl")]
    prepared = prepare_examples(config)
    mix = prepared.manifest["mix"]
    # 20 main rows at share 0.6 -> 33.3 in all: round(6.67) = 7 extra (its 5 rows, 2 of them
    # twice) and 7 general passages
    assert [row["used"] for row in mix["sources"]] == [20, 7, 7]
    assert mix["sources"][1]["repeated"] == 2
    assert prepared.manifest["counts"]["train_loaded"] == 20
    # the eval item reached training through the extra source only, and the check sees it
    assert prepared.manifest["leakage"]["exact"] >= 1
    assert "mix: dataset_path 59% (20), " in format_summary(prepared.manifest)
    assert sum(1 for e in prepared.train if e.text is not None) == 7
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "dataset_path": "main.jsonl", "dataset_mix": {"missing.jsonl": 0.2}}))  # fmt: skip
    with pytest.raises(TunelabError, match="'dataset_mix': .*missing.jsonl does not exist"):
        prepare_examples(load_config(tmp_path / "run.yaml"))
