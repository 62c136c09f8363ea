"""Turn tokenized examples into micro-batches with no compute spent on padding.

Packing puts several examples in one row of ``max_length`` tokens. Each example's positions
restart at 0, and transformers reads restarting ``position_ids`` (with no attention mask) as
packed sequences, so attention stays inside each example. The first token of every example is
never a target, so no example is trained to predict the start of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass
class Row:
    """One row of a batch: token ids, labels and positions (restarting per packed example)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    origins: list[str] = field(default_factory=list)  # where its examples came from

    def __len__(self) -> int:
        return len(self.input_ids)


def _row_of(example: TokenizedExample, origin: str | None = None) -> Row:
    labels = list(example.labels)
    labels[0] = IGNORE_INDEX  # nothing before it to predict it from
    positions = list(range(len(example.input_ids)))
    return Row(list(example.input_ids), labels, positions, [origin] if origin else [])


def pack_examples(
    examples: list[TokenizedExample], max_length: int, origins: list[str] | None = None
) -> list[Row]:
    """Pack examples into rows of at most ``max_length`` tokens (first-fit decreasing).

    Deterministic for a given input; the loop shuffles rows, not tokens. ``origins`` (one per
    example, e.g. "train.jsonl:12") travel with the rows so a failing batch can be named.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[Row] = []
    space: list[int] = []  # tokens left in each row
    for index in order:
        piece = _row_of(examples[index], origins[index] if origins else None)
        for r, left in enumerate(space):
            if len(piece) <= left:
                row = rows[r]
                row.input_ids += piece.input_ids
                row.labels += piece.labels
                row.position_ids += piece.position_ids
                row.origins += piece.origins
                space[r] -= len(piece)
                break
        else:
            rows.append(piece)
            space.append(max_length - len(piece))
    return rows


def single_rows(examples: list[TokenizedExample], origins: list[str] | None = None) -> list[Row]:
    """One example per row (packing off); rows of a batch are grouped by length instead."""
    return [_row_of(e, origins[i] if origins else None) for i, e in enumerate(examples)]


def collate(rows: Sequence[Row], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack rows into tensors; shorter rows are padded at the end with positions that keep
    counting, so padding only ever follows real tokens and is never attended to by them."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        last = row.position_ids[-1] if row.position_ids else -1
        position_ids[i] = torch.tensor(
            row.position_ids + list(range(last + 1, last + 1 + width - n))
        )
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def loss_tokens(rows: list[Row]) -> int:
    """Tokens that are targets of the loss (labels after the shift by one)."""
    return sum(sum(1 for label in r.labels[1:] if label != IGNORE_INDEX) for r in rows)


def plan_epoch(
    rows: list[Row], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The micro-batches (lists of row indices) of one epoch, shuffled by (seed, epoch).

    Without packing, rows are sorted by length inside windows of 50 batches before batching,
    so each batch holds rows of similar length and little padding, yet the order stays random.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(rows), generator=generator).tolist()
    if group_by_length:
        window = batch_size * 50
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: -len(rows[j]))
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:  # shuffle whole batches again so long ones are not all first
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches
