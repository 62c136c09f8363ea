"""Preference data in TRL's conventions: read, check, clean, deduplicate, tokenize.

Paired rows (DPO, IPO, ORPO, SimPO) are ``prompt``/``chosen``/``rejected``: plain strings, or
conversations (lists of ``{"role", "content"}`` messages). Without a ``prompt`` column the
prompt of a conversation is the messages that ``chosen`` and ``rejected`` share from the start
(TRL's implicit prompt). KTO rows are unpaired ``prompt``/``completion``/``label`` (a
boolean: was the completion good?); paired rows given to KTO become one good and one bad
completion each, as TRL's ``unpair_preference_dataset`` does.

Every bad row stops the run with one line: where it is, what was expected, what to do.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import FineTuningConfig
from tunelab.data import cleaning, privacy
from tunelab.data.dedup import exact_key, near_duplicates
from tunelab.data.loading import load_records
from tunelab.data.schema import Example
from tunelab.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    _tokenize_with_spans,
    as_messages,
    bos_text,
    chat_spans,
    render_chat,
    with_bos,
)
from tunelab.errors import TunelabError

Messages = list[dict[str, str]]
Text = str | Messages


@dataclass
class PreferenceExample:
    """One checked row: a prompt and its answers (chosen/rejected, or KTO's completion)."""

    origin: str
    prompt: Text
    chosen: Text | None = None
    rejected: Text | None = None
    completion: Text | None = None
    label: bool | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def texts(self) -> list[str]:
        parts = [self.prompt, self.chosen, self.rejected, self.completion]
        return [t for p in parts if p is not None for t in _strings(p)]

    def map_texts(self, fn: Any, plain_fn: Any = None) -> PreferenceExample:
        """``fn`` applied to every text; plain (non-conversational) strings get ``plain_fn``
        instead where given: they are joined as they stand (prompt + answer), so an edit
        there must keep the joining whitespace."""

        def edit(value: Text | None) -> Text | None:
            if value is None:
                return None
            if isinstance(value, str):
                return (plain_fn or fn)(value)
            return [{**m, "content": fn(m["content"])} for m in value]

        return PreferenceExample(
            self.origin,
            edit(self.prompt) or "",
            edit(self.chosen),
            edit(self.rejected),
            edit(self.completion),
            self.label,
        )


def _strings(value: Text) -> list[str]:
    return [value] if isinstance(value, str) else [m["content"] for m in value]


def _bad(origin: str, problem: str, fix: str) -> TunelabError:
    return TunelabError(f"{origin}: {problem}. {fix}")


def _blank(answer: Text) -> bool:
    """Whether an answer says nothing: only whitespace, or a conversation whose final message
    does (that message is what the model is taught to give or avoid)."""
    texts = _strings(answer)
    return not texts or not texts[-1].strip()


def _check_cleaned(example: PreferenceExample, steps: list[str]) -> None:
    """Refuse a row that cleaning left without an answer or with two equal answers: it would
    train on an empty answer, or on a pair with nothing to prefer."""
    by = f" after cleaning ({', '.join(steps)})" if steps else ""
    fix = "Give it text that survives cleaning, or remove the row"
    sides = {
        "chosen": example.chosen,
        "rejected": example.rejected,
        "completion": example.completion,
    }
    for name, answer in sides.items():
        if answer is not None and _blank(answer):
            raise _bad(example.origin, f"the '{name}' answer is empty{by}", fix)
    if example.chosen is not None and example.chosen == example.rejected:
        raise _bad(
            example.origin,
            f"'chosen' and 'rejected' are identical{by}, so there is nothing to prefer",
            "Make them differ in more than what cleaning removes, or remove the row",
        )


def _texts_alike(row: dict[str, Any], first: str, second: str, origin: str) -> tuple[Text, Text]:
    """The two columns' texts; refused unless both are strings or both are conversations."""
    a, b = _text(row, first, origin), _text(row, second, origin)
    if isinstance(a, str) != isinstance(b, str):
        raise _bad(
            origin,
            f"'{first}' and '{second}' differ in type (one text, one conversation)",
            "Give both as strings or both as lists of messages",
        )
    return a, b


def _text(row: dict[str, Any], key: str, origin: str) -> Text:
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in value:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _bad(
                    origin,
                    f"'{key}' holds a message without a string 'role' and 'content' ({m!r})",
                    'Each message must be {"role": ..., "content": "..."}',
                )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise _bad(
        origin,
        f"'{key}' is {type(value).__name__} ({repr(value)[:60]}), expected a string or a list "
        "of {role, content} messages",
        f"Fix the row's '{key}'",
    )


def parse_row(row: dict[str, Any], origin: str, objective: str) -> list[PreferenceExample]:
    """The checked example(s) of one raw row (two for a paired row read for KTO)."""
    paired_keys = {"chosen", "rejected"} & row.keys()
    if objective == "kto" and "completion" in row:
        return [_unpaired(row, origin)]
    if not paired_keys:
        if "completion" in row and "label" in row:
            raise _bad(
                origin,
                f"objective {objective} needs prompt/chosen/rejected rows, this row is KTO's "
                "prompt/completion/label",
                "Use objective: kto for unpaired data, or give chosen and rejected answers",
            )
        raise _bad(
            origin,
            f"expected 'chosen' and 'rejected' columns, found {sorted(row)}",
            "Preference rows are {prompt, chosen, rejected} (TRL's format); make pairs from "
            "prompt/completion data with 'tunelab data pairs'",
        )
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None or row[key] == "" or row[key] == []:
            raise _bad(
                origin,
                f"the '{key}' answer is missing or empty",
                "Give every row both answers, or remove the row",
            )
    chosen, rejected = _texts_alike(row, "chosen", "rejected", origin)
    if "prompt" in row and row["prompt"] is not None:
        prompt = _text(row, "prompt", origin)
        if isinstance(prompt, str) != isinstance(chosen, str):
            raise _bad(
                origin,
                "'prompt' and the answers differ in type (text vs conversation)",
                "Give prompt, chosen and rejected in the same form",
            )
    elif isinstance(chosen, list):
        assert isinstance(rejected, list)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise _bad(
                origin,
                "without a 'prompt' column the prompt is what 'chosen' and 'rejected' share from "
                "the start, but their first messages differ (prompt not shared)",
                "Give a 'prompt' column, or start both conversations with the same turns",
            )
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not chosen or not rejected:
            raise _bad(
                origin,
                "one conversation is the other's start: an answer is empty",
                "Give each conversation its own final answer",
            )
    else:
        raise _bad(
            origin,
            "plain-text 'chosen'/'rejected' without a 'prompt' column",
            "Add the prompt column (an implicit prompt is read from conversations only)",
        )
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(answer, list) and answer[-1]["role"] != "assistant":
            raise _bad(
                origin,
                f"the '{name}' conversation does not end with an assistant turn",
                "End each answer with the assistant's message",
            )
        if _blank(answer):
            raise _bad(
                origin,
                f"the '{name}' answer is empty or only whitespace",
                "Give every row both answers, or remove the row",
            )
    if chosen == rejected:
        raise _bad(
            origin,
            "'chosen' and 'rejected' are identical, so there is nothing to prefer",
            "Remove the row or give it a worse 'rejected' answer",
        )
    if objective == "kto":
        return [
            PreferenceExample(f"{origin} (chosen)", prompt, completion=chosen, label=True),
            PreferenceExample(f"{origin} (rejected)", prompt, completion=rejected, label=False),
        ]
    return [PreferenceExample(origin, prompt, chosen=chosen, rejected=rejected)]


def _unpaired(row: dict[str, Any], origin: str) -> PreferenceExample:
    for key in ("prompt", "completion", "label"):
        if key not in row or row[key] is None:
            raise _bad(
                origin,
                f"KTO rows need prompt, completion and label; '{key}' is missing",
                f"Add '{key}' to the row",
            )
    label = row["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        # a CSV or TSV file has no booleans: its true and false arrive as text (as pandas and
        # datasets read such a column, they are the booleans)
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise _bad(
            origin,
            f"'label' is {label!r} ({type(label).__name__}), expected a boolean",
            "Write true for a good completion and false for a bad one",
        )
    prompt, completion = _texts_alike(row, "prompt", "completion", origin)
    if _blank(completion):
        raise _bad(origin, "the 'completion' is empty", "Give a completion or remove the row")
    return PreferenceExample(origin, prompt, completion=completion, label=label)


def load_preference_examples(
    path: str, config: FineTuningConfig, eval_data: bool = False
) -> list[PreferenceExample]:
    from tunelab.data.prepare import read_limits  # the same caps as SFT data (max_data_bytes...)

    splits = ("validation", "test", "eval") if eval_data else ("train",)
    records = load_records(path, config.data_format, config.txt_split, splits, read_limits(config))
    return [e for r in records for e in parse_row(r.row, r.origin, config.objective)]


@dataclass
class PreparedPreference:
    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    manifest: dict[str, Any] = field(default_factory=dict)


def clean_preference(
    examples: list[PreferenceExample], config: FineTuningConfig, edits: Counter[str]
) -> list[PreferenceExample]:
    c = config
    steps: list[tuple[str, Any]] = []
    plain_steps: dict[str, Any] = {}  # a step's own form for plain strings
    if c.unicode_normalization != "none":
        steps.append(("unicode", lambda t: cleaning.normalize_unicode(t, c.unicode_normalization)))
    if c.clean_rules:
        rules = cleaning.parse_rules(c.clean_rules)
        steps.append(("rules", lambda t: cleaning.apply_rules(t, rules)))
    if c.strip_html:
        steps.append(("html", cleaning.strip_html))
    if c.fold_whitespace:
        steps.append(("whitespace", cleaning.fold_whitespace))
        # a plain prompt is joined to its answer as it stands ("...mean?\n" + "A bus is ..."):
        # stripping its trailing newline trained on text the model is never asked in
        plain_steps["whitespace"] = lambda t: cleaning.fold_whitespace(t, keep_edges=True)
    if c.pii_redact:
        steps.append(("pii", lambda t: privacy.redact(t)[0]))
    if c.drop_control_chars:
        steps.append(("control chars", lambda t: cleaning.drop_control_chars(t)[0]))
    out = []
    for example in examples:
        changed_by = []
        for name, fn in steps:
            edited = example.map_texts(fn, plain_steps.get(name))
            if edited.texts() != example.texts():
                edits[name] += 1
                changed_by.append(name)
            example = edited
        _check_cleaned(example, changed_by)
        out.append(example)
    return out


def _taught(example: PreferenceExample) -> str | None:
    """The prompt and the answer the model is taught to give (chosen, or a desirable KTO
    completion), as one text; None for an answer it is taught to avoid."""
    answer = example.chosen if example.completion is None else example.completion
    if answer is None or example.label is False:
        return None
    return "\n".join(_strings(example.prompt) + _strings(answer))


def quality_reason(example: PreferenceExample, config: FineTuningConfig) -> str | None:
    """Why a row fails the SFT quality filters (min_chars, max_chars, the garbage ratios),
    judged on its prompt and the answer it teaches; None when it passes. A rejected answer is
    not judged: a repetitive or broken answer is just what a rejected one may be."""
    text = _taught(example)
    if text is None:
        return None
    if len(text) < config.min_chars:
        return "shorter than min_chars"
    if config.max_chars is not None and len(text) > config.max_chars:
        return "longer than max_chars"
    reason = cleaning.garbage_reason(
        text,
        config.max_nonprintable_ratio,
        config.min_alpha_ratio,
        config.max_repeated_ngram_ratio,
    )
    return f"garbage: {reason}" if reason else None


def _similar_rejected(a: PreferenceExample, b: PreferenceExample, threshold: float) -> bool:
    """Whether two rows' rejected answers are near-equal too (always, for KTO rows)."""
    if a.rejected is None or b.rejected is None:
        return True
    texts = ["\n".join(_strings(b.rejected)), "\n".join(_strings(a.rejected))]
    return texts[0] == texts[1] or 1 in near_duplicates(texts, threshold)


def _near_key(example: PreferenceExample) -> str:
    """What near-dedup compares: the prompt with the taught answer (chosen, or the KTO
    completion with its label, so a good and a bad answer to one prompt both stay)."""
    answer = example.chosen if example.completion is None else example.completion
    label = "" if example.label is None else f"\n[label {example.label}]"
    return "\n".join(_strings(example.prompt) + _strings(answer or "")) + label


def _key(example: PreferenceExample) -> str:
    parts = [example.prompt, example.chosen, example.rejected, example.completion, example.label]
    return exact_key(repr(parts))


def prepare_preference(config: FineTuningConfig) -> PreparedPreference:
    """Read, check, clean, deduplicate and split the preference data, with a manifest of what
    was done (counts, duplicates, eval leakage), as the SFT data stage reports."""
    c = config
    loaded = load_preference_examples(c.dataset_path, c)
    if not loaded:
        raise TunelabError(f"{c.dataset_path} holds no rows. Add preference rows to it.")
    edits: Counter[str] = Counter()
    train = clean_preference(loaded, c, edits)
    held_out: list[PreferenceExample] = []
    if c.eval_path:
        held_out = clean_preference(
            load_preference_examples(c.eval_path, c, eval_data=True), c, Counter()
        )
    filtered: Counter[str] = Counter()
    filtered_examples: list[str] = []
    kept = []
    for example in train:
        reason = quality_reason(example, c)
        if reason is None:
            kept.append(example)
            continue
        filtered[reason] += 1
        if len(filtered_examples) < 5:
            filtered_examples.append(f"{example.origin} ({reason})")
    train = kept
    duplicates = 0
    if c.dedup_exact:
        seen: set[str] = set()
        kept = []
        for example in train:
            key = _key(example)
            duplicates += key in seen
            if key not in seen:
                kept.append(example)
            seen.add(key)
        train = kept
    near: dict[int, tuple[int, float]] = {}
    near_examples: list[str] = []
    if c.dedup_near_threshold is not None:
        near = near_duplicates([_near_key(e) for e in train], c.dedup_near_threshold)
        # one prompt and chosen answer with two different rejected answers are two lessons
        near = {
            i: (k, similarity)
            for i, (k, similarity) in near.items()
            if _similar_rejected(train[i], train[k], c.dedup_near_threshold)
        }
        near_examples = [
            f"{train[i].origin} ~ {train[k].origin} ({s:.2f})"
            for i, (k, s) in list(near.items())[:5]
        ]
        train = [e for i, e in enumerate(train) if i not in near]
    if not c.eval_path and c.eval_split > 0:
        order = list(range(len(train)))
        random.Random(c.seed).shuffle(order)
        count = max(1, round(len(train) * c.eval_split))
        chosen_for_eval = set(order[:count])
        held_out = [e for i, e in enumerate(train) if i in chosen_for_eval]
        train = [e for i, e in enumerate(train) if i not in chosen_for_eval]
    # a held-out prompt also trained on makes the held-out accuracy a training accuracy
    eval_prompts = {exact_key(repr(e.prompt)) for e in held_out}
    leaked = [e for e in train if exact_key(repr(e.prompt)) in eval_prompts]
    if c.drop_eval_leaks:
        train = [e for e in train if exact_key(repr(e.prompt)) not in eval_prompts]
    if not train:
        raise TunelabError(
            f"no preference rows left for training in {c.dataset_path} ({len(loaded)} read; "
            f"dropped: quality filters {sum(filtered.values())}, duplicates {duplicates}, "
            f"near duplicates {len(near)}, held out {len(held_out)}, eval leaks "
            f"{len(leaked) if c.drop_eval_leaks else 0}). Add rows or loosen those settings "
            "(min_chars, max_chars, the garbage ratios, dedup_near_threshold)."
        )
    conversational = sum(e.conversational for e in train)
    manifest: dict[str, Any] = {
        "objective": c.objective,
        "sft_only": [k for k in ("data_cache", "bias_report") if getattr(c, k)],
        "loaded": len(loaded),
        "edited": dict(edits),
        "quality_dropped": dict(filtered),
        "quality_examples": filtered_examples,
        "exact_duplicates_dropped": duplicates,
        "near_duplicates_dropped": len(near),
        "near_duplicate_examples": near_examples,
        "train": len(train),
        "eval": len(held_out),
        "conversational": conversational,
        "plain": len(train) - conversational,
        "leakage": {
            "prompts_in_eval": len(leaked),
            "dropped": len(leaked) if c.drop_eval_leaks else 0,
            "examples": [e.origin for e in leaked[:5]],
        },
    }
    if c.objective == "kto":
        manifest["desirable"] = sum(bool(e.label) for e in train)
        manifest["undesirable"] = len(train) - manifest["desirable"]
    return PreparedPreference(train, held_out, manifest)


def kto_balance_warning(
    desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """A warning when KTO's classes are one-sided or their weights leave the range the KTO paper
    recommends (Ethayarajh et al. 2024, section 4.2, as TRL's KTOTrainer checks):
    desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3]. None when
    the data and weights are in that range. (The weights are the training's settings, not the
    data stage's: they are passed in, and change no prepared data.)"""
    if not desirable or not undesirable:
        label, count = ("true", desirable) if desirable else ("false", undesirable)
        return (
            f"all {count} KTO training rows are labelled {label}: KTO then only pushes those "
            "answers against its running KL baseline, with nothing to contrast them with. Add "
            f"rows labelled {'false' if desirable else 'true'}, or train with objective: sft."
        )
    if not desirable_weight or not undesirable_weight:
        return None  # one class alone teaches, as the user chose with a weight of 0
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    low = undesirable * undesirable_weight / desirable
    return (
        f"KTO's weighted classes are out of balance: desirable_weight x {desirable} desirable / "
        f"(undesirable_weight x {undesirable} undesirable) = {ratio:.2f}, where the KTO paper "
        f"recommends 1 to 1.33. Set desirable_weight between {low:.2f} and {low * 4 / 3:.2f} "
        f"(with undesirable_weight {undesirable_weight:g})."
    )


def format_preference_summary(
    manifest: dict[str, Any], kto_weights: tuple[float, float] = (1.0, 1.0)
) -> str:
    """The data stage's report of ``manifest``; ``kto_weights`` (desirable_weight,
    undesirable_weight) judge a KTO file's balance (kto_balance_warning)."""
    leak = manifest["leakage"]
    lines = [
        f"Preference data ({manifest['objective']}): {manifest['loaded']} rows read, "
        f"{manifest['exact_duplicates_dropped']} duplicates and "
        f"{manifest.get('near_duplicates_dropped', 0)} near duplicates dropped, "
        f"{sum(manifest.get('quality_dropped', {}).values())} failed the quality filters, "
        f"{manifest['train']} for training, {manifest['eval']} held out "
        f"({manifest['conversational']} conversations, {manifest['plain']} plain).",
    ]
    if manifest.get("quality_dropped"):
        reasons = ", ".join(f"{k} {v}" for k, v in manifest["quality_dropped"].items())
        lines.append(
            f"  dropped by the quality filters (prompt and taught answer): {reasons}; first: "
            f"{manifest['quality_examples'][0]}"
        )
    if manifest.get("near_duplicates_dropped"):
        lines.append(
            f"  near duplicates (prompt and taught answer, dedup_near_threshold): first "
            f"{manifest['near_duplicate_examples'][0]}"
        )
    if manifest.get("sft_only"):
        lines.append(
            f"  note: {' and '.join(manifest['sft_only'])} cover SFT data only: preference data "
            "is read and checked again each run, without a bias report."
        )
    if manifest["edited"]:
        edited = ", ".join(f"{k} {v}" for k, v in manifest["edited"].items())
        lines.append(f"  cleaned (rows changed per step): {edited}")
    if "desirable" in manifest:
        lines.append(
            f"  KTO rows: {manifest['desirable']} desirable (true), "
            f"{manifest['undesirable']} undesirable (false)."
        )
        balance = kto_balance_warning(manifest["desirable"], manifest["undesirable"], *kto_weights)
        if balance:
            lines.append(f"  warning: {balance}")
    if leak["prompts_in_eval"]:
        lines.append(
            f"  warning: {leak['prompts_in_eval']} training rows share their prompt with a "
            f"held-out row (first: {leak['examples'][0]}); "
            + ("dropped." if leak["dropped"] else "set drop_eval_leaks: true to drop them.")
        )
    return "\n".join(lines)


def _tokenize_answer(
    prompt: Text,
    answer: Text,
    tokenizer: Any,
    max_length: int,
    chat: bool,
    system_prompt: str | None,
    bos: str | None = None,
) -> TokenizedExample:
    """Prompt and answer as one sequence; only the answer's tokens are in the loss. ``bos``:
    the tokenizer's ``bos_text``, worked out once by the caller (None: ask the tokenizer)."""
    if isinstance(prompt, list) or chat:
        prompt_messages = (
            prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        )
        answer_messages = (
            answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        )
        messages = as_messages(
            Example("", messages=prompt_messages + answer_messages), system_prompt
        )
        first_answer = len(messages) - len(answer_messages)
        text, spans = chat_spans(tokenizer, messages)
        # only the answer's turns: a multi-turn prompt's assistant turns are context, not scored
        # (rendered as chat_spans renders, under the same template limits)
        prompt_text = render_chat(
            tokenizer, messages[:first_answer], add_generation_prompt=True, allow_empty=True
        )
        spans = [span for span in spans if span[0] >= len(prompt_text)]
        return _tokenize_with_spans(tokenizer, text, spans, max_length)
    assert isinstance(answer, str)
    # as SFT renders a plain prompt (render_example)
    prompt = with_bos(bos_text(tokenizer) if bos is None else bos, prompt)
    text = prompt + answer + (tokenizer.eos_token or "")
    return _tokenize_with_spans(tokenizer, text, [(len(prompt), len(text))], max_length)


def tokenize_preference(
    examples: list[PreferenceExample],
    tokenizer: Any,
    max_length: int,
    chat: bool,
    system_prompt: str | None = None,
) -> list[Any]:
    """Units for training.preference: chosen/rejected pairs, or KTO completions each with the
    previous example's completion as its KL sequence (TRL's mismatched pairs)."""
    from tunelab.training.preference import Unit

    bos = bos_text(tokenizer)  # once, not per answer

    def encode(prompt: Text, answer: Text, origin: str) -> TokenizedExample:
        tokenized = _tokenize_answer(
            prompt, answer, tokenizer, max_length, chat, system_prompt, bos
        )
        if all(label == IGNORE_INDEX for label in tokenized.labels[1:]):
            raise TunelabError(
                f"{origin}: the answer has no tokens left within max_length {max_length}. Raise "
                "max_length or shorten the prompt."
            )
        return tokenized

    units = []
    for i, e in enumerate(examples):
        if e.completion is not None:
            previous = examples[i - 1].completion if len(examples) > 1 else e.completion
            assert previous is not None
            if isinstance(previous, str) != isinstance(e.prompt, str):
                previous = e.completion
            sides = {
                "completion": encode(e.prompt, e.completion, e.origin),
                "kl": _tokenize_answer(
                    e.prompt, previous, tokenizer, max_length, chat, system_prompt, bos
                ),
            }
            units.append(Unit(i, sides, e.origin, desirable=e.label))
        else:
            assert e.chosen is not None and e.rejected is not None
            sides = {
                "chosen": encode(e.prompt, e.chosen, e.origin),
                "rejected": encode(e.prompt, e.rejected, e.origin),
            }
            units.append(Unit(i, sides, e.origin))
    return units
