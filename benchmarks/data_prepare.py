"""Data-stage throughput: rows per second of ``prepare_examples`` on the full FOLDOC and on
100,000 synthetic rows of which 10% are near duplicates.

    python benchmarks/data_prepare.py [FOLDOC_JSONL] [--rows 100000]

Runs without a tokenizer (token statistics are a tokenizer call per batch on top) and without
the cache, so every step runs; the table lists the slowest steps of each run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from tunelab.config import FineTuningConfig
from tunelab.data.prepare import prepare_examples

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDOC = ROOT.parent / "shared" / "data" / "foldoc" / "foldoc.jsonl"


def synthetic_rows(count: int, near_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """Prompt/completion rows; ``near_fraction`` of them copy an earlier answer with one word
    changed (word 3-gram Jaccard 0.7-0.95 to their source)."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(8000)
    ]
    originals = int(count * (1 - near_fraction))
    rows = []
    for i in range(originals):
        answer = " ".join(rng.choices(vocab, k=rng.randint(20, 60)))
        rows.append(
            {
                "prompt": f"Question {i}: what is {rng.choice(vocab)}?",
                "completion": answer.capitalize() + ".",
            }
        )
    for _ in range(count - originals):
        source = rng.choice(rows[:originals])
        words = source["completion"].split()
        words[rng.randrange(len(words))] = rng.choice(vocab)
        rows.append({"prompt": source["prompt"], "completion": " ".join(words)})
    rng.shuffle(rows)
    return rows


def measure(name: str, config: FineTuningConfig) -> dict:
    start = time.perf_counter()
    prepared = prepare_examples(config)
    seconds = time.perf_counter() - start
    manifest = prepared.manifest
    loaded = manifest["counts"]["train_loaded"]
    steps = sorted(manifest["steps"], key=lambda s: -s["seconds"])[:3]
    return {
        "name": name,
        "rows": loaded,
        "kept": manifest["counts"]["train"],
        "dropped": manifest["dropped"]["train"],
        "seconds": seconds,
        "rows_per_s": loaded / seconds,
        "slowest": ", ".join(f"{s['step']} {s['seconds']:.2f}s" for s in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("foldoc", nargs="?", default=str(DEFAULT_FOLDOC))
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    results = []
    if Path(args.foldoc).is_file():
        foldoc = FineTuningConfig(
            dataset_path=args.foldoc, prompt_template="What does {term} mean?",
            completion_template="{definition}", clean_rules=["foldoc"], data_cache=False,
        )  # fmt: skip
        results.append(measure("FOLDOC (foldoc rules)", foldoc))
    else:
        print(f"skipping FOLDOC: {args.foldoc} not found", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "synthetic.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.rows)))
        config = FineTuningConfig(dataset_path=str(path), data_cache=False)
        results.append(measure(f"synthetic {args.rows:,} (10% near dup)", config))
    header = ("data", "rows", "kept", "seconds", "rows/s", "dropped", "slowest steps")
    print(
        f"| {header[0]:34} | "
        + " | ".join(f"{h:>7}" for h in header[1:5])
        + " | dropped | slowest |"
    )
    print("|" + "---|" * 7)
    for r in results:
        dropped = ", ".join(f"{n} {k}" for k, n in r["dropped"].items()) or "none"
        print(f"| {r['name']:34} | {r['rows']:>7,} | {r['kept']:>7,} | {r['seconds']:>7.1f} | "
              f"{r['rows_per_s']:>7,.0f} | {dropped} | {r['slowest']} |")  # fmt: skip


if __name__ == "__main__":
    main()
