"""Rebuild the FOLDOC subset shipped in data/ (run from the repo root, where ../shared exists).

The subset keeps the source text exactly, markup included: cleaning it is part of the demo.
"""

import json
import random
import sys
from pathlib import Path

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/foldoc/foldoc.jsonl")
OUT = Path(__file__).parent / "data"
TRAIN, HELD_OUT = 1200, 200

rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines()]
# entries of a paragraph or two: long enough to teach something, short enough to train fast
usable = [r for r in rows if 150 <= len(r["definition"]) <= 600 and len(r["term"]) <= 40]
random.Random(2023).shuffle(usable)
OUT.mkdir(exist_ok=True)
for name, part in (
    ("train.jsonl", usable[:TRAIN]),
    ("heldout.jsonl", usable[TRAIN : TRAIN + HELD_OUT]),
):
    with (OUT / name).open("w", encoding="utf-8") as file:
        for row in part:
            file.write(
                json.dumps(
                    {"term": row["term"], "definition": row["definition"]}, ensure_ascii=False
                )
                + "\n"
            )
print(f"wrote {TRAIN} training and {HELD_OUT} held-out entries to {OUT}")
