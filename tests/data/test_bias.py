"""Bias report numbers, counterfactual swaps, rebalancing: before and after."""

from __future__ import annotations

import json

import pytest

from tunelab.data import bias
from tunelab.data.schema import Example
from tunelab.errors import TunelabError


@pytest.fixture(scope="module")
def lists():
    return bias.load_wordlists()


def texts(*values):
    return [Example(f"d:{i}", text=t) for i, t in enumerate(values)]


def test_report_counts_and_imbalance(lists):
    data = texts("He said his father was a man of few words.", "She left.", "Nothing here.")
    report = bias.bias_report(data, lists)
    gender = report["dimensions"]["gender"]
    assert gender["mentions"] == {"female": 1, "male": 4}
    assert gender["examples"] == {"female": 1, "male": 1}
    assert gender["imbalance_ratio"] == 4.0 and gender["most"] == "male"
    assert report["examples_with_terms"] == 2
    assert report["flagged_count"] == 1 and report["flagged"][0]["origin"] == "d:0"
    assert report["dimensions"]["religion"]["imbalance_ratio"] is None  # every group absent


def test_two_word_terms(lists):
    found = bias.find_terms("Young people and senior citizens", lists)
    assert ("age", "young", "young people") in found and ("age", "old", "senior citizens") in found


def test_swap_keeps_case_and_picks_him_or_his(lists):
    assert (
        bias.swap_terms("He gave her book to Her. THE MAN!", lists)
        == "She gave his book to Him. THE WOMAN!"
    )
    assert bias.swap_terms("the king and queen", lists) == "the queen and king"


def test_counterfactual_balances_gender(lists):
    data = texts("He is a programmer.", "His code works and he knows it.", "A neutral line.")
    added = bias.counterfactual_augment(data, lists)
    assert [e.text for e in added] == ["She is a programmer.", "Her code works and she knows it."]
    after = bias.bias_report(data + added, lists)["dimensions"]["gender"]
    assert after["mentions"] == {"female": 3, "male": 3} and after["imbalance_ratio"] == 1.0


def test_rebalance_resamples_minority_group(lists):
    data = texts("He codes.", "He tests.", "He ships.", "She reviews.", "Nobody.")
    added, per_group = bias.rebalance(data, lists, "gender", seed=0)
    assert per_group == {"female": 2, "male": 0}
    assert [e.text for e in added] == ["She reviews.", "She reviews."]
    after = bias.bias_report(data + added, lists)["dimensions"]["gender"]
    assert after["examples"] == {"female": 3, "male": 3}
    with pytest.raises(TunelabError, match="not a word-list dimension"):
        bias.rebalance(data, lists, "gendr", seed=0)


def test_extra_wordlists_extend_and_errors(tmp_path):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"dimension": "gender", "groups": {"nonbinary": ["they"]}}))
    lists = bias.load_wordlists([str(extra)])
    assert "nonbinary" in lists.groups["gender"] and lists.terms["they"] == ("gender", "nonbinary")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TunelabError, match="bad.json: a word list needs 'dimension'"):
        bias.load_wordlists([str(tmp_path / "bad.json")])
