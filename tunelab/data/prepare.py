"""The data stage as one call: load, map to examples, (clean,) split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import FineTuningConfig
from tunelab.data.loading import load_records
from tunelab.data.schema import Example, to_example
from tunelab.errors import TunelabError


@dataclass
class PreparedData:
    """Training and held-out examples, plus what was done to get them."""

    train: list[Example]
    eval: list[Example] | None
    manifest: dict[str, Any] = field(default_factory=dict)


def load_examples(path: str | Path, config: FineTuningConfig) -> list[Example]:
    """Every row of a data file or folder as a canonical example (errors name the row)."""
    records = load_records(path)
    return [to_example(r.row, r.origin, prompt_template=config.prompt_template,
                       completion_template=config.completion_template) for r in records]


def prepare_examples(config: FineTuningConfig, tokenizer: Any = None) -> PreparedData:
    """Load the training (and eval) data of a run."""
    if not config.dataset_path:
        raise TunelabError(
            "config key 'dataset_path' is empty. Set it to your training data, e.g. "
            "dataset_path: data/train.jsonl"
        )
    train = load_examples(config.dataset_path, config)
    held_out = load_examples(config.eval_path, config) if config.eval_path else None
    return PreparedData(train, held_out, {"train_examples": len(train)})
