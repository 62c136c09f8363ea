"""Preference tuning on the SFT loop: packed answer pairs, the reference cache, one step.

A *unit* is what the loss scores as one: a prompt's chosen and rejected answer (DPO, IPO,
ORPO, SimPO), or one KTO answer with its mismatched KL sequence. A unit's sequences always
share a row (so one micro-batch holds the whole unit); units are packed into rows like SFT
examples, positions restarting per sequence so attention stays inside each.

The reference model's log-probabilities are computed once, before the first step, and kept
in the run folder keyed by each sequence's content hash: a second epoch, a resumed run or
an evaluation reads them instead of running the reference model again.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tunelab.config import FineTuningConfig
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.errors import TunelabError
from tunelab.files import atomic_write_text
from tunelab.training.batching import Row, collate
from tunelab.training.distributed import (
    World,
    all_reduce_sum,
    current_world,
    gather_objects,
    shard,
)
from tunelab.training.logprobs import sequence_logprobs
from tunelab.training.objectives import (
    LENGTH_NORMALISED,
    WITH_REFERENCE,
    Settings,
    kto_losses,
    pair_losses,
)
from tunelab.training.precision import mixed_precision
from tunelab.training.sharding import forwards_to_add

REFERENCE_CACHE = "reference_logps.json"


@dataclass
class Unit:
    """One scored unit before packing: its tokenized sequences by side."""

    index: int
    sides: dict[str, TokenizedExample]  # chosen/rejected, or completion/kl
    origin: str = ""
    desirable: bool | None = None  # KTO's label


@dataclass
class Sequence:
    """Where one answer sits in its row, and what it is."""

    unit: int
    side: str
    start: int
    end: int
    key: str  # content hash of its tokens and loss mask: the reference cache's key
    desirable: bool | None = None
    reference_logp: float | None = None


@dataclass
class PreferenceRow(Row):
    sequences: list[Sequence] = field(default_factory=list)


def settings_of(config: FineTuningConfig) -> Settings:
    return Settings(
        objective=config.objective,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        simpo_gamma=config.simpo_gamma,
        cpo_alpha=config.cpo_alpha,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
    )


def _key(example: TokenizedExample) -> str:
    text = json.dumps([example.input_ids, example.labels]).encode()
    return hashlib.sha256(text).hexdigest()[:32]


def pack_units(units: list[Unit], max_length: int, packing: bool = True) -> list[PreferenceRow]:
    """Pack units into rows of at most ``max_length`` tokens (first-fit decreasing), one unit
    per row when ``packing`` is off. A unit longer than ``max_length`` (chosen plus rejected,
    each up to max_length) gets a row of its own."""
    sizes = [sum(len(t.input_ids) for t in u.sides.values()) for u in units]
    order = sorted(range(len(units)), key=lambda i: -sizes[i])
    rows: list[PreferenceRow] = []
    space: list[int] = []
    for index in order:
        unit = units[index]
        target = None
        if packing:
            target = next((r for r, left in enumerate(space) if sizes[index] <= left), None)
        if target is None:
            rows.append(PreferenceRow([], [], []))
            space.append(max_length)
            target = len(rows) - 1
        row = rows[target]
        for side, example in unit.sides.items():
            start = len(row.input_ids)
            labels = list(example.labels)
            labels[0] = IGNORE_INDEX  # nothing before it in its sequence to predict it from
            row.input_ids += example.input_ids
            row.labels += labels
            row.position_ids += range(len(example.input_ids))
            row.sequences.append(
                Sequence(
                    unit.index, side, start, len(row.input_ids), _key(example), unit.desirable
                )  # fmt: skip
            )
        row.origins.append(unit.origin)
        space[target] -= sizes[index]
    return rows


def ignores_position_ids(model: Any) -> bool:
    """Whether ``model``'s forward drops ``position_ids``: PEFT's prompt-learning adapters
    (prompt and prefix tuning) prepend virtual tokens and ignore them, so sequences packed into
    one row would attend to each other (a rejected answer reading the chosen one)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _batch(
    rows: list[PreferenceRow], pad_token_id: int, device: str, one_row_per_sequence: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[Sequence]]:
    """The rows as tensors, and each token's sequence (-1 for padding). With
    ``one_row_per_sequence`` (a model that ignores positions, ``ignores_position_ids``) every
    answer gets a row of its own, so nothing but causal order separates it from the others."""
    if one_row_per_sequence:
        rows = [
            PreferenceRow(
                row.input_ids[s.start : s.end],
                row.labels[s.start : s.end],
                row.position_ids[s.start : s.end],
                row.origins,
                [replace(s, start=0, end=s.end - s.start)],
            )  # fmt: skip
            for row in rows
            for s in row.sequences
        ]
    batch = collate(rows, pad_token_id)
    index = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    sequences: list[Sequence] = []
    for r, row in enumerate(rows):
        for sequence in row.sequences:
            index[r, sequence.start : sequence.end] = len(sequences)
            sequences.append(sequence)
    moved = {k: v.to(device) for k, v in batch.items()}
    return moved, index.to(device), sequences


def count_units(rows: list[PreferenceRow]) -> int:
    return len({s.unit for row in rows for s in row.sequences})


def chosen_tokens(rows: list[PreferenceRow]) -> int:
    """Loss tokens of the chosen answers: the denominator of ORPO's and SimPO's NLL term."""
    return sum(
        sum(1 for label in row.labels[s.start + 1 : s.end] if label != IGNORE_INDEX)
        for row in rows
        for s in row.sequences
        if s.side == "chosen"
    )


@dataclass
class StepStats:
    """Per-unit values gathered over a step's micro-batches, for TRL-named metrics."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.values.setdefault(name, []).extend(tensor.detach().float().flatten().tolist())

    def gathered(self, world: World) -> StepStats:
        """The values of every process's share of the step (rank order), for metrics of the
        whole step rather than of one process's micro-batches."""
        if not world.active:
            return self
        merged = StepStats()
        for values in gather_objects(self.values, world):
            for name, numbers in values.items():
                merged.values.setdefault(name, []).extend(numbers)
        return merged

    def metrics(self, prefix: str = "") -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.values.items() if v}
        out: dict[str, float] = {}
        for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            if name in means:
                out[prefix + name] = means[name]
        if "rewards/chosen" in means and "rewards/rejected" in means:
            out[prefix + "rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        if "rewards/accuracies" in means:
            out[prefix + "rewards/accuracies"] = means["rewards/accuracies"]
        if "kl" in means:
            out[prefix + "kl"] = means["kl"]
        return out


def preference_loss(
    model: Any,
    rows: list[PreferenceRow],
    settings: Settings,
    pad_token_id: int,
    device: str,
    step_units: int,
    step_chosen_tokens: int,
    stats: StepStats | None = None,
) -> torch.Tensor:
    """The micro-batch's share of the step's loss: its units' summed losses over the step's
    ``step_units`` (and the NLL term over ``step_chosen_tokens``), so accumulated
    micro-batches give the gradient of one batch holding them all."""
    batch, index, sequences = _batch(rows, pad_token_id, device, ignores_position_ids(model))
    sums, counts = sequence_logprobs(model, batch, index, len(sequences))
    where = {(s.unit, s.side): i for i, s in enumerate(sequences)}
    units = sorted({s.unit for s in sequences})

    def pick(side: str, values: torch.Tensor) -> torch.Tensor:
        return values[torch.tensor([where[(u, side)] for u in units], device=values.device)]

    def reference(side: str) -> torch.Tensor:
        values = [sequences[where[(u, side)]].reference_logp for u in units]
        if any(v is None for v in values):
            raise TunelabError("internal: reference log-probabilities were not computed")
        return torch.tensor(values, dtype=torch.float32, device=sums.device)

    stats = stats if stats is not None else StepStats()
    if settings.objective == "kto":
        logps = pick("completion", sums)
        desirable = torch.tensor(
            [bool(sequences[where[(u, "completion")]].desirable) for u in units],
            device=sums.device,
        )
        losses, rewards, kl = kto_losses(
            settings, logps, reference("completion"), desirable,
            pick("kl", sums).detach(), reference("kl"),
        )  # fmt: skip
        stats.add("rewards/chosen", rewards[desirable])
        stats.add("rewards/rejected", rewards[~desirable])
        stats.add("logps/chosen", logps[desirable])
        stats.add("logps/rejected", logps[~desirable])
        stats.add("kl", kl)
        return losses.sum() / max(step_units, 1)

    chosen, rejected = pick("chosen", sums), pick("rejected", sums)
    chosen_n = pick("chosen", counts).clamp(min=1)
    rejected_n = pick("rejected", counts).clamp(min=1)
    reference_chosen = reference_rejected = None
    if settings.objective in WITH_REFERENCE:
        reference_chosen, reference_rejected = reference("chosen"), reference("rejected")
    scored_chosen, scored_rejected = chosen, rejected
    if settings.objective in LENGTH_NORMALISED:
        scored_chosen, scored_rejected = chosen / chosen_n, rejected / rejected_n
        if reference_chosen is not None and reference_rejected is not None:
            reference_chosen = reference_chosen / chosen_n
            reference_rejected = reference_rejected / rejected_n
    losses, chosen_rewards, rejected_rewards = pair_losses(
        settings, scored_chosen, scored_rejected, reference_chosen, reference_rejected
    )
    loss = losses.sum() / max(step_units, 1)
    nll_weight = {"orpo": 1.0, "simpo": settings.cpo_alpha}.get(settings.objective, 0.0)
    if nll_weight:
        loss = loss - nll_weight * chosen.sum() / max(step_chosen_tokens, 1)
    stats.add("rewards/chosen", chosen_rewards)
    stats.add("rewards/rejected", rejected_rewards)
    stats.add("rewards/accuracies", (chosen_rewards > rejected_rewards).float())
    stats.add("logps/chosen", scored_chosen)
    stats.add("logps/rejected", scored_rejected)
    return loss


def accumulate_preference_gradients(
    model: Any,
    micro_batches: list[list[PreferenceRow]],
    config: FineTuningConfig,
    pad_token_id: int,
    device: str = "cpu",
    precision: str = "fp32",
    step_units: int | None = None,
    step_chosen_tokens: int | None = None,
    scaler: Any = None,
    idle_batches: list[list[PreferenceRow]] | None = None,
) -> tuple[float, StepStats]:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss
    (mean over its units) and its per-unit statistics. ``idle_batches`` run a forward and a
    backward that add nothing to the gradients, loss or statistics (FSDP's short shares)."""
    from tunelab.training.precision import backward_precision

    settings = settings_of(config)
    if step_units is None:
        step_units = sum(count_units(rows) for rows in micro_batches)
    if step_chosen_tokens is None:
        step_chosen_tokens = sum(chosen_tokens(rows) for rows in micro_batches)
    stats = StepStats()
    total = 0.0
    for rows in micro_batches:
        with mixed_precision(model, device, precision):
            loss = preference_loss(
                model, rows, settings, pad_token_id, device, step_units, step_chosen_tokens,
                stats,
            )  # fmt: skip
        with backward_precision(model, precision):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
    for rows in idle_batches or []:
        with mixed_precision(model, device, precision):
            loss = preference_loss(
                model, rows, settings, pad_token_id, device, step_units, step_chosen_tokens
            )
        with backward_precision(model, precision):
            (loss * 0.0).backward()
    return total, stats


# what a preference evaluation is summed up by, in TRL's names (KTO has no accuracy)
EVAL_HEADLINE = ("rewards/accuracies", "rewards/margins", "kl")


def format_eval_metrics(loss: float, metrics: dict[str, float], prefix: str = "") -> str:
    """'eval loss 0.6931, rewards/accuracies 0.750, rewards/margins 0.0123': a preference
    evaluation in one line (``metrics`` keyed as ``StepStats.metrics`` with ``prefix``);
    a perplexity of a preference loss would mean nothing, so none is shown."""
    parts = [f"eval loss {loss:.4f}"]
    parts += [
        f"{name} {metrics[prefix + name]:.4f}" for name in EVAL_HEADLINE if prefix + name in metrics
    ]
    return ", ".join(parts)


@torch.no_grad()
def evaluate_preference(
    model: Any,
    rows: list[PreferenceRow],
    config: FineTuningConfig,
    pad_token_id: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[float, dict[str, float]]:
    """(mean loss, TRL-named metrics) of the model on held-out units."""
    was_training = model.training
    model.eval()
    settings = settings_of(config)
    units = sum(count_units([row]) for row in rows)
    tokens = chosen_tokens(rows)
    stats = StepStats()
    total = 0.0
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start : start + config.batch_size]
        with mixed_precision(model, device, precision):
            total += float(
                preference_loss(model, chunk, settings, pad_token_id, device, units, tokens, stats)
            )
    model.train(was_training)
    return total, stats.metrics()


@contextmanager
def reference_model(model: Any, frozen_copy: Any = None) -> Iterator[Any]:
    """The model that scores answers as the reference: the base with the adapter switched
    off (PEFT's ``disable_adapter``, no second copy), or ``frozen_copy`` (full fine-tuning)."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    if not hasattr(model, "disable_adapter"):
        raise TunelabError(
            "full fine-tuning needs a frozen copy of the model as the reference; none was made."
        )
    with model.disable_adapter():
        yield model


def frozen_reference(model: Any) -> Any:
    """A frozen copy of a fully fine-tuned model, taken before its first step."""
    if hasattr(model, "disable_adapter"):
        return None
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def attach_reference_logps(
    model: Any,
    row_sets: list[list[PreferenceRow]],
    cache_file: Path,
    pad_token_id: int,
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
    frozen_copy: Any = None,
) -> int:
    """Give every sequence of ``row_sets`` its reference log-probability (summed over its
    answer tokens): from ``cache_file`` where its content hash is there, else by running the
    reference model, whose results are added to the cache. Returns the forwards run (by all
    the processes together).

    Over several processes each runs its share of the missing micro-batches, all of them get
    every value (any process may train on any row), and rank 0 alone writes the cache, after
    every process has read it (the gather waits for all), atomically."""
    world = current_world()
    cache: dict[str, float] = {}
    if cache_file.is_file():
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    missing_rows = []
    for rows in row_sets:
        for row in rows:
            for sequence in row.sequences:
                sequence.reference_logp = cache.get(sequence.key)
            if any(s.reference_logp is None for s in row.sequences):
                missing_rows.append(row)
    forwards = 0
    if not missing_rows:
        return 0
    if frozen_copy is None and not hasattr(model, "disable_adapter"):
        raise TunelabError(
            f"{cache_file} lacks reference log-probabilities for this data, and a fully "
            "fine-tuned model that has already been trained cannot be its own reference. "
            "Start the run again (without --resume)."
        )
    was_training = model.training
    model.eval()
    # the same micro-batches as one process makes, dealt out: the same values
    chunks = [missing_rows[i : i + batch_size] for i in range(0, len(missing_rows), batch_size)]
    computed: dict[str, float] = {}
    with torch.no_grad(), reference_model(model, frozen_copy) as scorer:
        mine = shard(chunks, world)
        # under FSDP the shorter shares repeat a micro-batch whose values are dropped
        idle = [chunks[0]] * forwards_to_add(len(chunks), len(mine), scorer, world)
        separate = ignores_position_ids(scorer)
        for number, chunk in enumerate(mine + idle):
            batch, index, sequences = _batch(chunk, pad_token_id, device, separate)
            with mixed_precision(scorer, device, precision):
                sums, _ = sequence_logprobs(scorer, batch, index, len(sequences))
            if number < len(mine):
                forwards += 1
                computed.update(zip((s.key for s in sequences), sums.tolist(), strict=True))
    model.train(was_training)
    for share in gather_objects(computed, world):
        cache.update(share)
    for row in missing_rows:
        for sequence in row.sequences:
            sequence.reference_logp = cache[sequence.key]
    if world.is_main:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache))
    return int(all_reduce_sum(forwards, world))


def needs_reference(config: FineTuningConfig) -> bool:
    return config.objective in WITH_REFERENCE
