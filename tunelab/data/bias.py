"""A bias report over demographic terms, and two mitigations: counterfactual augmentation and
rebalancing by resampling.

Word lists live in ``tunelab/data/wordlists/<dimension>.json``::

    {"dimension": "gender",
     "groups": {"female": ["she", "woman", ...], "male": ["he", "man", ...]},
     "pairs": [["she", "he"], ["woman", "man"], ...]}

``pairs`` drive counterfactual swaps (both ways). A user extends the lists with files of the
same shape (config key ``bias_wordlists``): groups and pairs of a known dimension are merged,
a new dimension is added. Counting terms is a crude lens: it shows who the data talks about and
how often, not how; flagged examples are for a person to read.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.data.schema import Example
from tunelab.errors import TunelabError

FLAG_MIN_MENTIONS = 3  # an example naming one group this often, and no other, is flagged
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
# 'her' is 'his' before a noun ('her book') and 'him' elsewhere ('gave it to her')
_OBJECT_CONTEXT = {
    "", "and", "or", "to", "in", "on", "at", "with", "for", "from", "that", "the", "a", "an",
    "is", "was", "as", "about", "by", "into", "of", "up", "out", "off", "again", "too",
}  # fmt: skip


@dataclass
class WordLists:
    """term -> (dimension, group), and the counterfactual swap of each paired term."""

    terms: dict[str, tuple[str, str]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # dimension -> group names
    swaps: dict[str, str] = field(default_factory=dict)


def load_wordlists(extra_files: list[str] | None = None) -> WordLists:
    """The shipped word lists plus the user's ``extra_files`` (same JSON shape)."""
    specs = []
    folder = resources.files("tunelab.data") / "wordlists"
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            specs.append((item.name, json.loads(item.read_text(encoding="utf-8"))))
    for name in extra_files or []:
        path = Path(name)
        try:
            specs.append((str(path), json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TunelabError(
                f"bias_wordlists file {path} cannot be read ({exc}). Expected JSON like "
                '{"dimension": "gender", "groups": {"female": [...], "male": [...]}, '
                '"pairs": [["she", "he"]]}.'
            ) from None
    lists = WordLists()
    for source, spec in specs:
        _add_spec(lists, spec, source)
    return lists


def _add_spec(lists: WordLists, spec: Any, source: str) -> None:
    groups = spec.get("groups") if isinstance(spec, dict) else None
    dimension = spec.get("dimension") if isinstance(spec, dict) else None
    if not isinstance(dimension, str) or not isinstance(groups, dict):
        raise TunelabError(
            f"{source}: a word list needs 'dimension' (a name) and 'groups' (a mapping of group "
            "name to a list of terms). Fix the file."
        )
    names = lists.groups.setdefault(dimension, [])
    for group, terms in groups.items():
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise TunelabError(f"{source}: group '{group}' should be a list of terms.")
        if group not in names:
            names.append(group)
        for term in terms:
            lists.terms[" ".join(term.lower().split())] = (dimension, group)
    for pair in spec.get("pairs", []):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        ):
            raise TunelabError(f"{source}: each entry of 'pairs' should be [term, term].")
        first, second = (t.lower() for t in pair)
        lists.swaps.setdefault(first, second)
        lists.swaps.setdefault(second, first)


def find_terms(text: str, lists: WordLists) -> list[tuple[str, str, str]]:
    """Every (dimension, group, term) mentioned in ``text``, two-word terms included."""
    words = [w.lower() for w in _WORD.findall(text)]
    found = []
    for i, word in enumerate(words):
        if i + 1 < len(words):
            pair = f"{word} {words[i + 1]}"
            if pair in lists.terms:
                found.append((*lists.terms[pair], pair))
                continue
        if word in lists.terms:
            found.append((*lists.terms[word], word))
    return found


def bias_report(examples: list[Example], lists: WordLists, keep: int = 10) -> dict[str, Any]:
    """Mentions and examples per group, imbalance ratio per dimension, flagged examples."""
    mentions: dict[str, Counter[str]] = {d: Counter() for d in lists.groups}
    example_counts: dict[str, Counter[str]] = {d: Counter() for d in lists.groups}
    with_terms = 0
    flagged: list[dict[str, Any]] = []
    for example in examples:
        found = find_terms("\n".join(example.texts()), lists)
        if not found:
            continue
        with_terms += 1
        per_dimension: dict[str, Counter[str]] = {}
        for dimension, group, _ in found:
            per_dimension.setdefault(dimension, Counter())[group] += 1
        for dimension, counts in per_dimension.items():
            mentions[dimension].update(counts)
            example_counts[dimension].update(counts.keys())
            group, top = counts.most_common(1)[0]
            if len(counts) == 1 and top >= FLAG_MIN_MENTIONS:
                flagged.append(
                    {
                        "origin": example.origin,
                        "dimension": dimension,
                        "group": group,
                        "terms": sorted({t for d, g, t in found if d == dimension}),
                        "mentions": top,
                    }
                )
    dimensions = {}
    for dimension, groups in lists.groups.items():
        totals = {g: mentions[dimension][g] for g in groups}
        low, high = min(totals.values()), max(totals.values())
        dimensions[dimension] = {
            "mentions": totals,
            "examples": {g: example_counts[dimension][g] for g in groups},
            "imbalance_ratio": round(high / low, 3) if low else None,
            "absent": [g for g, n in totals.items() if n == 0],
            "most": max(totals, key=totals.__getitem__) if high else None,
        }
    return {
        "examples": len(examples),
        "examples_with_terms": with_terms,
        "dimensions": dimensions,
        "flagged_count": len(flagged),
        "flagged": sorted(flagged, key=lambda f: -f["mentions"])[:keep],
    }


def _match_case(word: str, replacement: str) -> str:
    if word.isupper() and len(word) > 1:
        return replacement.upper()
    if word[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def swap_terms(text: str, lists: WordLists) -> str:
    """``text`` with every paired term swapped for its counterpart, case kept."""
    words = list(_WORD.finditer(text))
    pieces, last = [], 0
    for i, match in enumerate(words):
        word = match.group()
        lower = word.lower()
        if lower not in lists.swaps:
            continue
        replacement = lists.swaps[lower]
        if lower == "her" and lists.swaps.get("his") == "her":
            after = words[i + 1].group().lower() if i + 1 < len(words) else ""
            gap = text[match.end() : words[i + 1].start()] if i + 1 < len(words) else ""
            replacement = "him" if after in _OBJECT_CONTEXT or gap.strip() else "his"
        pieces.append(text[last : match.start()])
        pieces.append(_match_case(word, replacement))
        last = match.end()
    pieces.append(text[last:])
    return "".join(pieces)


def counterfactual_augment(examples: list[Example], lists: WordLists) -> list[Example]:
    """One swapped copy of every example that mentions a paired term (the originals stay)."""
    added = []
    for example in examples:
        swapped = example.map_texts(lambda t: swap_terms(t, lists))
        if swapped.texts() != example.texts():
            swapped.origin = f"{example.origin} (counterfactual)"
            added.append(swapped)
    return added


def rebalance(
    examples: list[Example], lists: WordLists, dimension: str, seed: int
) -> tuple[list[Example], dict[str, int]]:
    """Copies of examples resampled so each group of ``dimension`` leads as many examples as
    the largest group; returns the copies and how many were added per group."""
    if dimension not in lists.groups:
        raise TunelabError(
            f"bias_rebalance_dimension {dimension!r} is not a word-list dimension; use one of "
            f"{', '.join(lists.groups)}."
        )
    by_group: dict[str, list[Example]] = {g: [] for g in lists.groups[dimension]}
    for example in examples:
        counts = Counter(
            g for d, g, _ in find_terms("\n".join(example.texts()), lists) if d == dimension
        )
        top = counts.most_common(2)
        if top and (len(top) == 1 or top[0][1] > top[1][1]):
            by_group[top[0][0]].append(example)
    target = max((len(members) for members in by_group.values()), default=0)
    rng = random.Random(seed)
    added: list[Example] = []
    per_group: dict[str, int] = {}
    for group, members in by_group.items():
        if not members:
            continue  # nothing to resample from; the report shows the group as absent
        extra = [rng.choice(members) for _ in range(target - len(members))]
        per_group[group] = len(extra)
        for copy_number, example in enumerate(extra, start=1):
            clone = example.map_texts(lambda t: t)
            clone.origin = f"{example.origin} (resampled {copy_number})"
            added.append(clone)
    return added, per_group
