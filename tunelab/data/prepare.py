"""The data stage as one call: load, map to examples, clean, filter, deduplicate, split, check
leakage, report bias (and mitigate), measure lengths, and cache the result.

Every step is counted: an edit step counts the examples it changed, a filter step counts what
it dropped by reason, and both keep a few (redacted) examples for the report. The manifest that
``prepare_examples`` returns holds all of it, so nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config import DATA_KEYS, FineTuningConfig
from tunelab.data import bias, cleaning, dedup, privacy
from tunelab.data.loading import (
    ReadLimits,
    data_files,
    is_regular,
    load_records,
    snapshot_pipes,
)
from tunelab.data.schema import Example, is_empty_answer, message_texts, to_example
from tunelab.data.store import (
    PreparedData,
    format_summary,
    read_cache,
    write_cache,
    write_prepared,
)
from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

__all__ = ["PreparedData", "format_summary", "load_examples", "prepare_examples", "write_prepared"]

DATA_VERSION = 5  # bump when a change to this stage changes what it produces
SAMPLES_PER_STEP = 3
SAMPLE_CHARS = 300
# a row this many times longer than max_length (in tokens, at ~4 characters a token) is mostly
# truncated away: worth a word before training on it
LONG_ROW_FACTOR = 8
CHARS_PER_TOKEN = 4


def load_examples(
    path: str | Path, config: FineTuningConfig, eval_data: bool = False
) -> list[Example]:
    """Every row of a data file or folder as a canonical example (errors name the row)."""
    splits = ("validation", "test", "eval") if eval_data else ("train",)
    records = load_records(path, config.data_format, config.txt_split, splits, read_limits(config))
    examples = [
        to_example(
            r.row,
            r.origin,
            schema=config.data_schema,
            prompt_template=config.prompt_template,
            completion_template=config.completion_template,
        )
        for r in records
    ]
    _warn_long_rows(examples, config.max_length)
    return examples


def read_limits(config: FineTuningConfig) -> ReadLimits:
    """The config's caps on what one data path may hold."""
    return ReadLimits(config.max_data_bytes, config.max_row_bytes, config.max_rows)


def _warn_long_rows(examples: list[Example], max_length: int) -> None:
    limit = LONG_ROW_FACTOR * max_length * CHARS_PER_TOKEN
    long = [e for e in examples if sum(len(t) for t in e.texts()) > limit]
    if long:
        logger.warning(
            f"{len(long)} row(s) longer than {limit:,} characters (about "
            f"{LONG_ROW_FACTOR}x max_length={max_length} tokens), first at {long[0].origin}; "
            "training keeps only the first max_length tokens of each. Split long documents "
            "(txt_split, or shorter rows) or raise max_length."
        )


def _shown(text: str) -> str:
    """Text as a report may show it: PII always redacted, length capped."""
    redacted = privacy.redact(text)[0]
    return redacted if len(redacted) <= SAMPLE_CHARS else redacted[:SAMPLE_CHARS] + "..."


def _joined(example: Example) -> str:
    return "\n".join(example.texts())


@dataclass
class Tally:
    """The counted steps of one split (train or eval), in order."""

    split: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    def edit(
        self, name: str, examples: list[Example], fn: Callable[[Example], Example]
    ) -> list[Example]:
        samples: list[dict[str, str]] = []
        start, out, changed = time.perf_counter(), [], 0
        for example in examples:
            edited = fn(example)
            if edited.texts() != example.texts():
                changed += 1
                if len(samples) < SAMPLES_PER_STEP:
                    samples.append(
                        {
                            "origin": example.origin,
                            "before": _shown(_joined(example)),
                            "after": _shown(_joined(edited)),
                        }
                    )
            out.append(edited)
        self._log(name, "edit", start, changed=changed, examples=samples)
        return out

    def filter(
        self, name: str, examples: list[Example], reason_of: Callable[[int, Example], str | None]
    ) -> list[Example]:
        samples: list[dict[str, str]] = []
        reasons: Counter[str] = Counter()
        start, kept = time.perf_counter(), []
        for index, example in enumerate(examples):
            reason = reason_of(index, example)
            if reason is None:
                kept.append(example)
                continue
            reasons[reason] += 1
            if len(samples) < SAMPLES_PER_STEP:
                samples.append(
                    {"origin": example.origin, "reason": reason, "text": _shown(_joined(example))}
                )
        self._log(
            name,
            "filter",
            start,
            dropped=sum(reasons.values()),
            reasons=dict(reasons),
            examples=samples,
        )
        return kept

    def _log(self, name: str, kind: str, start: float, **values: Any) -> None:
        seconds = round(time.perf_counter() - start, 3)
        self.steps.append(
            {"split": self.split, "step": name, "kind": kind, **values, "seconds": seconds}
        )

    def dropped(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for step in self.steps:
            totals.update(step.get("reasons", {}))
        return dict(totals)


def _edit_fields(example: Example, fn: Callable[[str, bool], str]) -> Example:
    """Apply ``fn(text, keep_edges)``; prompt/completion keep their joining spaces."""
    if example.kind == "prompt_completion":
        return Example(
            example.origin,
            prompt=fn(example.prompt or "", True),
            completion=fn(example.completion or "", True),
            meta=dict(example.meta),
        )
    return example.map_texts(lambda text: fn(text, False))


def _trained_text(example: Example) -> str:
    """What the loss covers: the text, the completion, or the assistant turns."""
    if example.messages is not None:
        return "".join(
            "".join(message_texts(m)) for m in example.messages if m["role"] == "assistant"
        )
    return example.completion if example.completion is not None else example.text or ""


def _clean(
    examples: list[Example],
    config: FineTuningConfig,
    tally: Tally,
    pii: Counter[str],
    pii_samples: list[dict[str, Any]],
) -> list[Example]:
    c = config
    if c.unicode_normalization != "none":
        form = c.unicode_normalization
        examples = tally.edit(
            "unicode",
            examples,
            lambda e: e.map_texts(lambda t: cleaning.normalize_unicode(t, form)),
        )
    if c.clean_rules:
        rules = cleaning.parse_rules(c.clean_rules)
        examples = tally.edit(
            "rules", examples, lambda e: e.map_texts(lambda t: cleaning.apply_rules(t, rules))
        )
    if c.strip_html:
        examples = tally.edit("html", examples, lambda e: e.map_texts(cleaning.strip_html))
    if c.fold_whitespace:
        examples = tally.edit(
            "whitespace", examples, lambda e: _edit_fields(e, cleaning.fold_whitespace)
        )

    def redact(example: Example) -> Example:
        found: Counter[str] = Counter()

        def one(text: str) -> str:
            redacted, counts = privacy.redact(text)
            found.update(counts)
            return redacted

        redacted = example.map_texts(one)
        pii.update(found)
        for kind in found:
            if sum(1 for s in pii_samples if s["type"] == kind) < SAMPLES_PER_STEP:
                shown = privacy.snippet(_joined(redacted), privacy.PLACEHOLDERS[kind])
                pii_samples.append({"origin": example.origin, "type": kind, "snippet": shown})
        return redacted if c.pii_redact else example

    return tally.edit("pii", examples, redact)


def _filter(examples: list[Example], config: FineTuningConfig, tally: Tally) -> list[Example]:
    c = config

    def quality(_: int, example: Example) -> str | None:
        if not _trained_text(example).strip():
            return "empty"
        size = sum(len(t) for t in example.texts())
        if size < c.min_chars:
            return "shorter than min_chars"
        if c.max_chars is not None and size > c.max_chars:
            return "longer than max_chars"
        reason = cleaning.garbage_reason(
            _joined(example),
            c.max_nonprintable_ratio,
            c.min_alpha_ratio,
            c.max_repeated_ngram_ratio,
        )
        return f"garbage: {reason}" if reason else None

    examples = tally.filter("quality", examples, quality)
    _count_empty_turns(examples, tally)
    return examples


def _count_empty_turns(examples: list[Example], tally: Tally) -> None:
    """Count the empty assistant turns of chats that have other answers: tokenize leaves them
    out of the loss (an empty reply is not an answer), and the report says how many, as it
    says how many empty completions were dropped."""
    samples: list[dict[str, str]] = []
    start, turns = time.perf_counter(), 0
    for example in examples:
        empty = [i for i, m in enumerate(example.messages or []) if is_empty_answer(m)]
        turns += len(empty)
        if empty and len(samples) < SAMPLES_PER_STEP:
            samples.append(
                {
                    "origin": example.origin,
                    "reason": f"empty assistant turn(s) {', '.join(map(str, empty))}",
                    "text": _shown(_joined(example)),
                }
            )
    if turns:
        tally._log("empty turns", "mask", start, masked=turns, examples=samples)


def _drop_control_chars(examples: list[Example], tally: Tally) -> list[Example]:
    """Terminal escapes and other controls out of the text (after the quality filter, so a
    row that is mostly binary is still dropped as garbage rather than shrunk to a fragment)."""
    removed = 0

    def drop(text: str) -> str:
        nonlocal removed
        cleaned, count = cleaning.drop_control_chars(text)
        removed += count
        return cleaned

    examples = tally.edit("control chars", examples, lambda e: e.map_texts(drop))
    tally.steps[-1]["removed_chars"] = removed
    return examples


def _deduplicate(
    examples: list[Example], config: FineTuningConfig, tally: Tally, shown: list[dict[str, Any]]
) -> list[Example]:
    if config.dedup_exact:
        start = time.perf_counter()
        exact = dedup.exact_duplicates([_joined(e) for e in examples])
        searching = time.perf_counter() - start

        def exact_reason(index: int, example: Example) -> str | None:
            if index not in exact:
                return None
            if len(shown) < 2 * SAMPLES_PER_STEP:
                shown.append(
                    {
                        "split": tally.split,
                        "kind": "exact",
                        "origin": example.origin,
                        "duplicate_of": examples[exact[index]].origin,
                        "similarity": 1.0,
                        "text": _shown(_joined(example)),
                    }
                )
            return "exact duplicate"

        examples = tally.filter("exact dedup", examples, exact_reason)
        tally.steps[-1]["seconds"] = round(tally.steps[-1]["seconds"] + searching, 3)
    if config.dedup_near_threshold is not None:
        start = time.perf_counter()
        near = dedup.near_duplicates([_joined(e) for e in examples], config.dedup_near_threshold)
        searching = time.perf_counter() - start

        def near_reason(index: int, example: Example) -> str | None:
            if index not in near:
                return None
            kept, similarity = near[index]
            if sum(1 for s in shown if s["kind"] == "near") < 2 * SAMPLES_PER_STEP:
                shown.append(
                    {
                        "split": tally.split,
                        "kind": "near",
                        "origin": example.origin,
                        "duplicate_of": examples[kept].origin,
                        "similarity": round(similarity, 3),
                        "text": _shown(_joined(example)),
                        "kept_text": _shown(_joined(examples[kept])),
                    }
                )
            return "near duplicate"

        examples = tally.filter("near dedup", examples, near_reason)
        tally.steps[-1]["seconds"] = round(tally.steps[-1]["seconds"] + searching, 3)
    return examples


# --- lengths ---------------------------------------------------------------------------------


def token_lengths(examples: list[Example], tokenizer: Any, config: FineTuningConfig) -> list[int]:
    """Tokens per example as training renders it (BOS, chat template, EOS), untruncated."""
    from tunelab.data.tokenize import bos_text, render_example, uses_chat_template

    if not examples:
        return []
    chat = uses_chat_template(tokenizer, config.chat_format)
    bos = bos_text(tokenizer)
    texts = [
        render_example(e, tokenizer, chat, config.system_prompt, answer_spans=False, bos=bos)[0]
        for e in examples
    ]
    lengths: list[int] = []
    for start in range(0, len(texts), 2048):
        encoded = tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"]
        lengths.extend(len(ids) for ids in encoded)
    return lengths


def _length_key(example: Example) -> str:
    """What an example's token count depends on, the config being fixed: its content. Not its
    id(): an example dropped by a filter is freed, and a new one (a bias counterfactual, a
    mixed-in row) can be given the same id and so the dropped one's length."""
    fields = [example.text, example.prompt, example.completion, example.messages, example.tools]
    return json.dumps(fields, sort_keys=True, default=str)


def length_stats(values: list[int], bins: int = 30) -> dict[str, Any] | None:
    """Count, mean, percentiles and a histogram of a list of lengths."""
    if not values:
        return None
    array = np.asarray(values)
    counts, edges = np.histogram(array, bins=min(bins, max(1, len(set(values)))))
    return {
        "count": len(values),
        "mean": round(float(array.mean()), 1),
        "min": int(array.min()),
        "p50": int(np.percentile(array, 50)),
        "p95": int(np.percentile(array, 95)),
        "max": int(array.max()),
        "histogram": {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()},
    }


# --- the stage ------------------------------------------------------------------------------


def _hash_inputs(path: str) -> list[dict[str, Any]]:
    files = []
    for file in data_files(path):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        # a pipe's private copy is named by the path the user gave
        shown = file if is_regular(Path(path)) else Path(path)
        files.append(
            {"path": str(shown), "sha256": digest.hexdigest(), "bytes": file.stat().st_size}
        )
    return files


def _settings(config: FineTuningConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in DATA_KEYS}


def _tokenizer_name(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _tokenizer_rules(tokenizer: Any) -> str | None:
    """A digest of how ``tokenizer`` renders and splits text: its rules (the fast tokenizer's
    JSON, with the post-processor that puts BOS in front), chat template and special tokens.
    A tokenizer edited in place keeps its folder and vocabulary size, and tokens cached under
    those alone trained with a BOS (or template) that generation no longer renders."""
    if tokenizer is None:
        return None
    from tunelab.data.tokenize import bos_text

    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else bos_text(tokenizer),
        str(getattr(tokenizer, "chat_template", None) or ""),
        str([getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")]),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def content_hash(config: FineTuningConfig, tokenizer: Any, inputs: dict[str, Any]) -> str:
    """The cache key: input file hashes, every data setting, the tokenizer, the stage version."""
    settings = {
        k: v for k, v in _settings(config).items() if k not in ("dataset_path", "eval_path")
    }
    key = {
        "version": DATA_VERSION,
        "inputs": {split: [f["sha256"] for f in files] for split, files in inputs.items()},
        # examples carry their file:line origin into previews and error messages, so the same
        # bytes under another name are prepared again rather than reported under the old name
        "origins": {
            split: [str(f.get("path", "")) for f in files] for split, files in inputs.items()
        },
        "settings": settings,
        "tokenizer": _tokenizer_name(tokenizer),
        "vocab": len(tokenizer) if tokenizer is not None else None,
        "rules": _tokenizer_rules(tokenizer),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _empty_error(path: str, what: str, loaded: int, tally: Tally) -> TunelabError:
    dropped = ", ".join(f"'{reason}' removed {n}" for reason, n in tally.dropped().items())
    return TunelabError(
        f"{path}: no {what} examples left after filtering ({loaded} loaded; "
        f"{dropped or 'none dropped'}). "
        "Loosen those settings (e.g. min_chars, max_chars, min_tokens, max_tokens, the garbage "
        "ratios, dedup_near_threshold, drop_eval_leaks) or check the data."
    )


def _split(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded hold-out of ``fraction`` of the examples (each side keeps the file order)."""
    count = max(1, round(len(examples) * fraction)) if len(examples) > 1 else 0
    held = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def prepare_examples(config: FineTuningConfig, tokenizer: Any = None) -> PreparedData:
    """Load, clean, filter, deduplicate and split the data of a run (cached by content hash).

    ``tokenizer`` (optional) enables the token filters and token statistics. The manifest
    records input hashes, settings, each step's counts with examples, PII, duplicates, leakage,
    bias and lengths; ``manifest["content_hash"]`` keys any later cache of this data.
    """
    if not config.dataset_path:
        raise TunelabError(
            "config key 'dataset_path' is empty. Set it to your training data, e.g. "
            "dataset_path: data/train.jsonl"
        )
    for key in ("dataset_path", "eval_path"):
        value = getattr(config, key)
        if value and not Path(value).exists():
            raise TunelabError(
                f"{key} {value} does not exist. Check the path (relative paths in a config "
                "file are read from the config's folder)."
            )
    # a pipe is read once, into a private copy that both the hash and the loading read
    with snapshot_pipes([config.dataset_path, config.eval_path], read_limits(config)):
        return _prepare_cached(config, tokenizer)


def _prepare_cached(config: FineTuningConfig, tokenizer: Any) -> PreparedData:
    inputs = {"train": _hash_inputs(config.dataset_path)}
    if config.dataset_mix or config.replay_general_share:
        from tunelab.data.mixing import check_mix

        for path, _ in check_mix(config.dataset_mix, config.replay_general_share):
            if not Path(path).exists():
                raise TunelabError(
                    f"config key 'dataset_mix': {path} does not exist. Check the path "
                    "(relative paths in a config file are read from the config's folder)."
                )
            inputs[f"mix {path}"] = _hash_inputs(path)
    if config.eval_path:
        inputs["eval"] = _hash_inputs(config.eval_path)
    key = content_hash(config, tokenizer, inputs)
    from tunelab.models import cache_dir

    folder = cache_dir() / "data" / key
    if config.data_cache:
        cached = read_cache(folder)
        if cached is not None:
            return cached
    prepared = _prepare(config, tokenizer, inputs, key)
    prepared.manifest["cache_dir"] = str(folder) if config.data_cache else None
    if config.data_cache:
        write_cache(folder, prepared)
    return prepared


def _prepare(
    config: FineTuningConfig, tokenizer: Any, inputs: dict[str, Any], key: str
) -> PreparedData:
    started = time.perf_counter()
    c = config
    pii: dict[str, Counter[str]] = {"train": Counter(), "eval": Counter()}
    pii_samples: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    tallies = {"train": Tally("train"), "eval": Tally("eval")}
    counts: dict[str, Any] = {}
    lengths: dict[str, int] = {}  # _length_key(example) -> its token count

    def stage(split: str, path: str) -> list[Example]:
        tally = tallies[split]
        start = time.perf_counter()
        examples = load_examples(path, c, eval_data=split == "eval")
        tally.steps.append(
            {
                "split": split,
                "step": "load",
                "kind": "load",
                "loaded": len(examples),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        counts[f"{split}_loaded"] = len(examples)
        examples = _clean(examples, c, tally, pii[split], pii_samples)
        examples = _filter(examples, c, tally)
        if c.drop_control_chars:
            examples = _drop_control_chars(examples, tally)
        examples = _deduplicate(examples, c, tally, duplicates)
        if tokenizer is not None and examples:
            for example, length in zip(
                examples, token_lengths(examples, tokenizer, c), strict=True
            ):
                lengths[_length_key(example)] = length
            if c.min_tokens or c.max_tokens is not None:

                def by_tokens(_: int, example: Example) -> str | None:
                    length = lengths[_length_key(example)]
                    if length < c.min_tokens:
                        return "fewer than min_tokens"
                    if c.max_tokens is not None and length > c.max_tokens:
                        return "more than max_tokens"
                    return None

                examples = tally.filter("tokens", examples, by_tokens)
        if not examples:
            raise _empty_error(path, split, counts[f"{split}_loaded"], tally)
        return examples

    train = stage("train", c.dataset_path)
    held_out = stage("eval", c.eval_path) if c.eval_path else None
    leakage: dict[str, Any] | None = None
    if held_out is None and c.eval_split > 0:
        train, held_out = _split(train, c.eval_split, c.seed)
        counts["eval_from_split"] = len(held_out)
        tallies["train"].steps.append(
            {
                "split": "train",
                "step": "eval split",
                "kind": "split",
                "moved": len(held_out),
                "seconds": 0.0,
            }
        )
        if not train:
            raise TunelabError(
                f"{c.dataset_path}: eval_split {c.eval_split} leaves no training examples "
                f"({len(held_out)} held out). Lower eval_split or add data."
            )
    mix = None
    if c.dataset_mix or c.replay_general_share:
        # mixed after the hold-out (held-out items come from dataset_path alone) and before
        # the leakage check (another source may hold an eval item too)
        from tunelab.data.mixing import check_mix, mix_training_data

        loaded = counts["train_loaded"]
        sources = [(p, w, stage("train", p)) for p, w in check_mix(c.dataset_mix, 0.0)]
        counts["train_loaded"] = loaded  # dataset_path's rows; each source's are in the mix
        train, mix = mix_training_data(train, sources, c.replay_general_share, c.seed)
    if held_out is not None and "eval_from_split" not in counts:
        leakage = _leakage(train, held_out, c, tallies["train"])
        train = leakage.pop("kept")
        if not train:
            raise _empty_error(c.dataset_path, "train", counts["train_loaded"], tallies["train"])
    bias_section = None
    if c.bias_report or c.bias_mitigation != "none":
        train, bias_section = _bias(train, c, tallies["train"])
    counts["train"] = len(train)
    counts["eval"] = len(held_out) if held_out is not None else 0
    manifest: dict[str, Any] = {
        "tunelab_data_version": DATA_VERSION,
        "content_hash": key,
        "cache_hit": False,
        "inputs": inputs,
        "settings": _settings(c),
        "tokenizer": _tokenizer_name(tokenizer),
        "counts": counts,
        "dropped": {split: t.dropped() for split, t in tallies.items() if t.steps},
        "steps": tallies["train"].steps + tallies["eval"].steps,
        "pii": {
            "redacted": c.pii_redact,
            "train": dict(pii["train"]),
            "eval": dict(pii["eval"]),
            "examples": pii_samples,
        },
        "duplicates": {"examples": duplicates},
        "leakage": leakage,
        "mix": mix,
        "bias": bias_section,
        "lengths": _lengths(train, held_out, tokenizer, c, lengths),
    }
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    return PreparedData(train, held_out, manifest)


def _leakage(
    train: list[Example], held_out: list[Example], c: FineTuningConfig, tally: Tally
) -> dict[str, Any]:
    matches = dedup.cross_matches(
        [_joined(e) for e in train], [_joined(e) for e in held_out], c.dedup_near_threshold
    )
    exact = sum(1 for _, similarity in matches.values() if similarity >= 1.0)
    samples = [
        {
            "origin": train[i].origin,
            "eval_origin": held_out[j].origin,
            "similarity": round(s, 3),
            "text": _shown(_joined(train[i])),
        }
        for i, (j, s) in list(matches.items())[: 2 * SAMPLES_PER_STEP]
    ]
    kept = train
    if c.drop_eval_leaks:
        kept = tally.filter(
            "eval leakage", train, lambda i, _: "leaked into eval" if i in matches else None
        )
    return {
        "exact": exact,
        "near": len(matches) - exact,
        "dropped": len(train) - len(kept),
        "examples": samples,
        "kept": kept,
    }


def _bias(
    train: list[Example], c: FineTuningConfig, tally: Tally
) -> tuple[list[Example], dict[str, Any]]:
    lists = bias.load_wordlists(c.bias_wordlists)
    start = time.perf_counter()
    section: dict[str, Any] = {
        "mitigation": c.bias_mitigation,
        "before": bias.bias_report(train, lists),
    }
    if c.bias_mitigation == "none":
        return train, section
    if c.bias_mitigation == "counterfactual":
        added = bias.counterfactual_augment(train, lists)
        section["added"] = len(added)
    else:
        added, per_group = bias.rebalance(train, lists, c.bias_rebalance_dimension, c.seed)
        section["added"] = len(added)
        section["added_per_group"] = per_group
    tally.steps.append(
        {
            "split": "train",
            "step": f"bias {c.bias_mitigation}",
            "kind": "add",
            "added": len(added),
            "examples": [
                {"origin": e.origin, "after": _shown(_joined(e))} for e in added[:SAMPLES_PER_STEP]
            ],
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    train = train + added
    section["after"] = bias.bias_report(train, lists)
    return train, section


def _lengths(
    train: list[Example],
    held_out: list[Example] | None,
    tokenizer: Any,
    c: FineTuningConfig,
    known: dict[str, int],
) -> dict[str, Any]:
    result = {}
    for split, examples in (("train", train), ("eval", held_out or [])):
        if not examples:
            continue
        section: dict[str, Any] = {
            "chars": length_stats([sum(len(t) for t in e.texts()) for e in examples])
        }
        if tokenizer is not None:
            keys = [_length_key(e) for e in examples]
            missing = [e for e, key in zip(examples, keys, strict=True) if key not in known]
            for example, length in zip(missing, token_lengths(missing, tokenizer, c), strict=True):
                known[_length_key(example)] = length
            tokens = [known[key] for key in keys]
            truncated = sum(1 for n in tokens if n > c.max_length)
            section.update(
                tokens=length_stats(tokens),
                max_length=c.max_length,
                truncated=truncated,
                truncation_rate=round(truncated / len(tokens), 4),
            )
        result[split] = section
    return result
