"""Knowledge probes: training items asked again, in other words and (where asked) verbatim.

Held-out items measure what a system does on questions nobody trained on (skill, style,
format). They cannot show whether fine-tuning *stored* the training facts, because no system
could know an unseen item's answer. Knowledge probes ask about training items instead
(Ovadia et al. 2023, "Fine-Tuning or Retrieval?"):

- ``reworded``: each chosen training question rewritten from templates, several rewordings per
  item, so a model that only memorised the exact prompt does not get credit for knowing;
- ``verbatim``: the training prompt exactly as trained (memorisation; off unless asked).

Templates use ``{subject}`` (what the question asks about, found by the patterns in
``SUBJECT_PATTERNS``: "What does X mean?", "What is X?", "Define X", ...) or ``{question}`` (the
whole trained question). The config key ``probe_templates`` replaces the default set. A probe
whose question holds a run of its own answer's words is dropped (``leaks``): it would measure
copying, not knowing.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import replace

from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import tokens
from tunelab.evaluation.systems import EvalItem

KNOWLEDGE_KINDS = ("reworded", "verbatim")
PLACEHOLDERS = ("subject", "question")
DEFAULT_TEMPLATES = (
    "Explain what {subject} is.",
    "Give a short definition of {subject}.",
    "I keep coming across {subject}. What is it?",
    "Describe {subject} in a few sentences.",
    "Tell me about {subject}.",
)
# used where no subject is found: the question kept whole, its framing changed
QUESTION_TEMPLATES = (
    "Please answer this question: {question}",
    "{question} Answer in your own words.",
    "Here is something I want to know. {question}",
)
SUBJECT_PATTERNS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"^what (?:does|do) (?:the (?:term|word|acronym) )?(.+?) (?:mean|stand for)\??$",
        r"^what is meant by (.+?)\??$",
        r"^what (?:is|are) (?:the (?:term|word) )?(.+?)\??$",
        r"^(?:please )?(?:define|explain|describe)(?: the (?:term|word))? (.+?)[.?!]?$",
        r"^(?:give|write) (?:me )?(?:a |the )?definition of (.+?)[.?!]?$",
    )
)
LEAK_WINDOW = 4  # consecutive answer words a question may not contain


def subject_of(question: str) -> str | None:
    """What a short question asks about ("What does RAID mean?" -> "RAID"), or None."""
    text = " ".join(question.split())
    for pattern in SUBJECT_PATTERNS:
        match = pattern.match(text)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return None


def check_templates(templates: list[str] | tuple[str, ...]) -> list[str]:
    """The user's ``probe_templates``, refused with a clear message when one cannot be used."""
    checked = []
    for number, template in enumerate(templates, start=1):
        if not isinstance(template, str) or not template.strip():
            raise TunelabError(
                f"config key 'probe_templates': entry {number} is empty; give a question such "
                "as 'Explain what {subject} is.' or 'In other words: {question}'."
            )
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise TunelabError(
                f"config key 'probe_templates': entry {number} ({template!r}) is not a valid "
                f"template ({exc}); write literal braces as {{{{ and }}}}."
            ) from exc
        unknown = fields - set(PLACEHOLDERS)
        if unknown or not fields:
            raise TunelabError(
                f"config key 'probe_templates': entry {number} ({template!r}) must use "
                f"{{subject}} or {{question}} and nothing else (found "
                f"{', '.join(sorted(unknown)) or 'no placeholder'}). A template that names the "
                "answer's column would put the answer into the question."
            )
        checked.append(template)
    return checked


def leaks(question: str, reference: str, window: int = LEAK_WINDOW) -> bool:
    """Whether ``question`` contains ``window`` consecutive words of ``reference`` (or all of a
    shorter reference), after SQuAD normalisation."""
    answer = tokens(reference)
    asked = f" {' '.join(tokens(question))} "
    if not answer:
        return False
    size = min(window, len(answer))
    return any(
        f" {' '.join(answer[i : i + size])} " in asked for i in range(len(answer) - size + 1)
    )


def rewordings(
    item: EvalItem, templates: list[str] | tuple[str, ...], count: int, start: int
) -> list[str]:
    """Up to ``count`` rewordings of ``item``'s question, templates taken in turn from
    ``start`` so that items do not all get the same ones; none equal to the trained question."""
    subject = subject_of(item.question)
    usable = [t for t in templates if subject is not None or "{subject}" not in t]
    trained = tokens(item.question)
    out: list[str] = []
    for offset in range(len(usable)):
        template = usable[(start + offset) % len(usable)]
        question = template.format(subject=subject or "", question=item.question.strip())
        if tokens(question) != trained and question not in out:
            out.append(question)
        if len(out) == count:
            break
    return out


def build_probes(
    pool: list[EvalItem],
    kinds: tuple[str, ...],
    count: int,
    per_item: int = 2,
    templates: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
) -> tuple[list[EvalItem], dict[str, int]]:
    """Knowledge probes over ``count`` training items drawn with ``seed`` (the same items for
    every kind, so the kinds compare): ``per_item`` rewordings each for "reworded", the
    trained question for "verbatim". Returns the probes (``probe`` says the kind, ``source``
    the training item's origin) and how many candidate items were left out and why."""
    unknown = [k for k in kinds if k not in KNOWLEDGE_KINDS]
    if unknown:
        raise TunelabError(
            f"unknown probe kind {unknown[0]!r}; knowledge probes are "
            f"{' and '.join(KNOWLEDGE_KINDS)}."
        )
    if per_item < 1:
        raise TunelabError(f"rewordings per item must be at least 1 (got {per_item}).")
    if templates is None:
        templates = (*DEFAULT_TEMPLATES, *QUESTION_TEMPLATES)
    else:
        templates = check_templates(templates)
    skipped = {"continuation": 0, "question_holds_answer": 0, "no_rewording": 0}
    candidates = []
    for item in pool:
        if item.continuation or not item.question.strip():
            skipped["continuation"] += 1  # plain text has no question to reword
        elif leaks(item.question, item.reference):
            skipped["question_holds_answer"] += 1
        else:
            candidates.append(item)
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    probes: list[EvalItem] = []
    for position, item in enumerate(chosen):
        if "reworded" in kinds:
            questions = [
                q
                for q in rewordings(item, templates, per_item, position)
                if not leaks(q, item.reference)
            ]
            if not questions:
                skipped["no_rewording"] += 1
            for number, question in enumerate(questions, start=1):
                probes.append(
                    replace(
                        item, question=question, origin=f"{item.origin} (reworded {number})",
                        probe="reworded", source=item.origin, terms=[],
                    )
                )  # fmt: skip
        if "verbatim" in kinds:
            probes.append(
                replace(item, origin=f"{item.origin} (verbatim)", probe="verbatim",
                        source=item.origin, terms=[])
            )  # fmt: skip
    return probes, skipped


def per_source(
    items: list[EvalItem], values: list[float | None]
) -> tuple[list[str], list[float | None]]:
    """One value per training item: the mean over its rewordings (rewordings of one item are
    not independent questions, so the bootstrap resamples items, not rewordings)."""
    groups: dict[str, list[float]] = {}
    order: list[str] = []
    for item, value in zip(items, values, strict=True):
        key = item.source or item.origin
        if key not in groups:
            groups[key] = []
            order.append(key)
        if value is not None:
            groups[key].append(value)
    return order, [sum(g) / len(g) if g else None for g in (groups[k] for k in order)]
