"""Knowledge probes: rewordings, no answer leaked into a question, retrieval rules, averaging."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import DEFINITIONS

from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import tokens
from tunelab.evaluation.probes import (
    build_probes,
    check_templates,
    leaks,
    per_source,
    subject_of,
)
from tunelab.evaluation.systems import EvalItem, PromptBuilder


def pool() -> list[EvalItem]:
    items = [
        EvalItem(f"What does {term} mean?", definition, f"train.jsonl:{i}")
        for i, (term, definition) in enumerate(DEFINITIONS.items(), start=1)
    ]
    # a question that holds its own answer, a chat-style question with no known pattern, and
    # a plain-text continuation (nothing to reword)
    items.append(EvalItem("Is a nibble four bits?", "Yes, a nibble is four bits.", "train.jsonl:7"))
    items.append(
        EvalItem(
            "Repeat after me: the cache is fast memory.",
            "The cache is fast memory.",
            "train.jsonl:8",
        )
    )
    items.append(EvalItem("Once upon a", "time there was a bug.", "train.jsonl:9", True))
    return items


def test_subject_of_reads_the_usual_question_shapes():
    assert subject_of("What does  RAID mean?") == "RAID"
    assert subject_of("what is a linked list?") == "a linked list"
    assert subject_of("Define the term closure.") == "closure"
    assert subject_of("What does the acronym TCP stand for?") == "TCP"
    assert subject_of("Is a nibble four bits?") is None


def test_reworded_probes_differ_from_the_trained_question_and_never_leak_the_answer():
    probes, skipped = build_probes(pool(), ("reworded", "verbatim"), count=20, per_item=3)
    trained = {item.origin: item for item in pool()}
    reworded = [p for p in probes if p.probe == "reworded"]
    # 6 definitions + the nibble question; the cache one holds its answer, the text has none
    assert skipped == {"continuation": 1, "question_holds_answer": 1, "no_rewording": 0}
    assert len({p.source for p in reworded}) == 7
    assert len(reworded) == 7 * 3
    for probe in probes:
        source = trained[probe.source]
        assert probe.reference == source.reference
        assert not leaks(probe.question, probe.reference)
        # the strict form of the promise: no four consecutive answer words in the question
        answer = tokens(probe.reference)
        asked = " ".join(tokens(probe.question))
        for i in range(max(len(answer) - 3, 1)):
            assert " ".join(answer[i : i + 4]) not in asked
        if probe.probe == "reworded":
            assert tokens(probe.question) != tokens(source.question)
        else:
            assert probe.question == source.question
    compiler = [p.question for p in reworded if p.source == "train.jsonl:1"]
    assert len(set(compiler)) == 3 and all("compiler" in q for q in compiler)
    nibble = [p.question for p in reworded if p.source == "train.jsonl:7"]
    assert all("Is a nibble four bits?" in q for q in nibble)  # no subject: the question kept


def test_leaks_finds_a_run_of_answer_words_or_a_short_answer_whole():
    assert leaks("Is it true that the core of an operating system is the kernel?",
                 "The core of an operating system.")  # fmt: skip
    assert leaks("Is a byte eight bits?", "Eight bits.")
    assert not leaks("What does kernel mean?", "The core of an operating system.")


def test_user_templates_are_used_and_one_naming_the_answer_is_refused():
    probes, _ = build_probes(pool(), ("reworded",), count=3, per_item=1,
                             templates=["In plain words, what is {subject}?"])  # fmt: skip
    assert {p.question.split(",")[0] for p in probes} == {"In plain words"}
    with pytest.raises(TunelabError, match=r"probe_templates.*entry 2.*\{definition\}|definition"):
        check_templates(["Explain {subject}.", "Is {subject} {definition}?"])
    with pytest.raises(TunelabError, match="entry 1 .*no placeholder"):
        check_templates(["Tell me something."])
    with pytest.raises(TunelabError, match="not a valid template"):
        check_templates(["Explain {subject"])


def test_probes_use_the_same_items_for_every_kind_and_follow_the_seed():
    first, _ = build_probes(pool(), ("reworded", "verbatim"), count=3, seed=1)
    again, _ = build_probes(pool(), ("reworded", "verbatim"), count=3, seed=1)
    other, _ = build_probes(pool(), ("reworded", "verbatim"), count=3, seed=2)
    assert [p.question for p in first] == [p.question for p in again]
    sources = {
        kind: {p.source for p in first if p.probe == kind} for kind in ("reworded", "verbatim")
    }
    assert sources["reworded"] == sources["verbatim"] and len(sources["verbatim"]) == 3
    assert {p.source for p in other} != sources["verbatim"] or [p.question for p in other] != [
        p.question for p in first
    ]


def test_per_source_averages_rewordings_of_one_item():
    items = [EvalItem("q", "r", f"o{i}", source=s) for i, s in enumerate("aab")]
    assert per_source(items, [0.2, 0.6, 1.0]) == (["a", "b"], [pytest.approx(0.4), 1.0])
    assert per_source(items, [None, 0.6, None]) == (["a", "b"], [0.6, None])


class _ByOrder:
    """A retriever that ranks the pool in its own order (the test decides what is 'similar')."""

    def __init__(self, ranking: list[int]) -> None:
        self.ranking = ranking

    def top_k(self, query: str, k: int) -> list[int]:
        return self.ranking[:k]


def test_rag_may_retrieve_a_probes_own_item_but_few_shot_never_shows_it():
    items = pool()[:4]
    probe = EvalItem("Explain what compiler is.", items[0].reference, "train.jsonl:1 (reworded 1)",
                     probe="reworded", source="train.jsonl:1")  # fmt: skip
    builder = PromptBuilder(
        SimpleNamespace(eos_token=""), False, None, items, _ByOrder([0, 1, 2, 3]), k=2
    )
    rag_prompt, _ = builder.render("rag", probe, 0)
    few_shot_prompt, _ = builder.render("few-shot", probe, 0)
    assert items[0].reference in rag_prompt
    assert items[0].reference not in few_shot_prompt
    assert items[1].reference in few_shot_prompt and items[2].reference in few_shot_prompt
    # a verbatim probe asks the trained question itself: RAG still finds its item
    verbatim = EvalItem(items[0].question, items[0].reference, "train.jsonl:1 (verbatim)",
                        probe="verbatim", source="train.jsonl:1")  # fmt: skip
    assert items[0].reference in builder.render("rag", verbatim, 0)[0]
    assert items[0].reference not in builder.render("few-shot", verbatim, 0)[0]
    # a held-out item repeating a training question still gets no leaked duplicate
    duplicate = EvalItem(items[0].question, items[0].reference, "heldout.jsonl:1")
    assert items[0].reference not in builder.render("rag", duplicate, 0)[0]
