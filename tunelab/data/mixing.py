"""Mix several training sources by weight, and replay general text against forgetting.

``dataset_mix`` maps extra sources to weights (``{data/more.jsonl: 0.2}``); ``replay_general_share``
is the share of general prose (the half of tunelab's shipped public-domain text that the
forgetting check does not read, see ``replay_passages``). Weights are shares of the final
training set; ``dataset_path`` keeps the rest (it must keep some) and is used whole, never
sampled down. With ``N = len(dataset_path's examples) / its share``, source ``i`` contributes
``round(N * weight_i)`` examples: drawn without repetition while it has enough, then repeated
(whole passes over the source first, then a seeded sample), which the report says.
"""

from __future__ import annotations

import random
from typing import Any

from tunelab.data.schema import Example
from tunelab.errors import TunelabError

GENERAL = "general text (replay)"


def replay_passages() -> list[str]:
    """General-prose passages used for replay: every other passage of the shipped text (the
    forgetting check reads the others when a run replayed, so it never scores trained text)."""
    from tunelab.evaluation.forgetting import general_passages

    return general_passages()[0::2]


def check_mix(mix: dict[str, float], replay_share: float) -> list[tuple[str, float]]:
    """``dataset_mix`` as (path, weight) pairs, refused with a message naming the source when
    a weight is out of range or the shares leave ``dataset_path`` none."""
    pairs = []
    for path, weight in mix.items():
        if not 0 < weight < 1:
            raise TunelabError(
                f"config key 'dataset_mix': {path} has weight {weight}; a weight is the "
                "source's share of the training set, between 0 and 1 (e.g. 0.2)."
            )
        pairs.append((path, float(weight)))
    if not 0 <= replay_share < 1:
        raise TunelabError(
            f"config key 'replay_general_share' is {replay_share}; give a share between 0 and 1 "
            "(e.g. 0.1: a tenth of the training set is general prose)."
        )
    total = sum(w for _, w in pairs) + replay_share
    if total >= 1:
        raise TunelabError(
            f"config keys 'dataset_mix' and 'replay_general_share' add up to {total:.2f}; they "
            "must leave dataset_path a share (sum below 1)."
        )
    return pairs


def draw(examples: list[Example], count: int, rng: random.Random) -> list[Example]:
    """``count`` examples: a seeded sample when there are enough, else whole passes over the
    examples plus a seeded sample of the remainder."""
    if not examples or count <= 0:
        return []
    passes, rest = divmod(count, len(examples))
    return examples * passes + rng.sample(examples, rest)


def mix_training_data(
    primary: list[Example],
    sources: list[tuple[str, float, list[Example]]],
    replay_share: float,
    seed: int,
) -> tuple[list[Example], dict[str, Any]]:
    """The training set mixed by weight (sources: (path, weight, prepared examples)), shuffled
    with ``seed``, and the mix as the data report shows it."""
    primary_share = 1 - sum(w for _, w, _ in sources) - replay_share
    total = len(primary) / primary_share
    rng = random.Random(seed)
    parts: list[tuple[str, float, list[Example], int]] = []
    for path, weight, examples in sources:
        parts.append((path, weight, examples, round(total * weight)))
    if replay_share > 0:
        general = [
            Example(origin=f"general_text.txt passage {2 * i + 1}", text=text)
            for i, text in enumerate(replay_passages())
        ]
        parts.append((GENERAL, replay_share, general, round(total * replay_share)))
    mixed = list(primary)
    report_sources: list[dict[str, Any]] = [
        {"path": "dataset_path", "weight": round(primary_share, 4), "available": len(primary),
         "used": len(primary), "repeated": 0},
    ]  # fmt: skip
    for path, weight, examples, count in parts:
        chosen = draw(examples, count, rng)
        mixed += chosen
        report_sources.append(
            {"path": path, "weight": weight, "available": len(examples), "used": len(chosen),
             "repeated": max(len(chosen) - len(examples), 0)}
        )  # fmt: skip
    rng.shuffle(mixed)
    for row in report_sources:
        row["share"] = round(row["used"] / max(len(mixed), 1), 4)
    return mixed, {"sources": report_sources, "examples": len(mixed)}


def describe_mix(mix: dict[str, Any]) -> str:
    """One line for the data summary: each source's share and count."""
    parts = []
    for row in mix["sources"]:
        repeated = f", {row['repeated']} repeated" if row["repeated"] else ""
        parts.append(f"{row['path']} {row['share'] * 100:.0f}% ({row['used']}{repeated})")
    return "mix: " + ", ".join(parts)
