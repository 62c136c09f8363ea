"""Problems found by re-reading a run's data with its own tokenizer: truncation, padding, the
chat template of training vs inference, and whether the end-of-answer token is trained on.

Nothing here trains or loads model weights; re-tokenizing the data takes seconds.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.diagnostics.findings import Finding
from tunelab.run_folder import DATA_MANIFEST, RESULTS

MOST = 0.5  # "most examples truncated", "most compute on padding"
NOTABLE = 0.1  # worth a note below that


@dataclass
class DataView:
    """The run's training examples as the trainer saw them."""

    examples: list[Any]
    tokenized: list[Any]  # TokenizedExample, truncated at max_length
    full_lengths: list[int]  # untruncated token counts
    chat: bool


def load_data_view(config: Any, tokenizer: Any) -> DataView:
    """Run the data stage and the tokenizer exactly as training did (no model needed)."""
    from tunelab.data.prepare import prepare_examples, token_lengths
    from tunelab.data.tokenize import tokenize_example, uses_chat_template

    examples = prepare_examples(config, tokenizer).train
    chat = uses_chat_template(tokenizer, config.chat_format)
    tokenized = [
        tokenize_example(e, tokenizer, config.max_length, chat, config.system_prompt)
        for e in examples
    ]
    return DataView(examples, tokenized, token_lengths(examples, tokenizer, config), chat)


def _p95(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _round_up(value: int, step: int = 64) -> int:
    return -(-value // step) * step


def check_truncation(
    results: dict[str, Any], manifest: dict[str, Any], view: DataView | None, max_length: int
) -> list[Finding]:
    """Examples longer than max_length lose their end (often the answer)."""
    data = results.get("data") or {}
    lengths = (manifest.get("lengths") or {}).get("train") or {}
    p95 = None
    if view is not None:
        truncated, total = sum(t.truncated for t in view.tokenized), len(view.tokenized)
        p95 = _p95(view.full_lengths) if view.full_lengths else None
        source = "re-tokenized data"
    elif isinstance(data.get("truncated_examples"), int) and data.get("examples"):
        truncated, total, source = data["truncated_examples"], data["examples"], RESULTS
    elif isinstance(lengths.get("truncated"), int) and lengths.get("tokens"):
        truncated, total = lengths["truncated"], lengths["tokens"].get("count", 0)
        source = DATA_MANIFEST
    else:
        return []
    if not total or truncated / total < NOTABLE:
        return []
    share = truncated / total
    suggestion = f"raise max_length (now {max_length})"
    if p95:
        suggestion += f" to {_round_up(p95)}, which covers 95% of the examples ({p95} tokens)"
    return [
        Finding(
            "truncation",
            "warning" if share >= MOST else "info",
            "Most examples are truncated" if share >= MOST else "Many examples are truncated",
            f"{truncated} of {total} training examples ({share:.0%}) are longer than max_length "
            f"{max_length} tokens ({source}); their ends, often the answers, are cut off.",
            f"{suggestion}; or split long texts into shorter examples before training.",
        )
    ]


def padding_share(tokenized: list[Any], config: Any) -> tuple[float, int, int]:
    """Share of the computed tokens that are padding in one epoch, batched as the trainer
    batches (packing, or single rows grouped by length unless group_by_length is off); with
    the real and padded token counts."""
    from tunelab.config import groups_by_length
    from tunelab.methods import PROMPT_METHODS
    from tunelab.training.batching import pack_examples, plan_epoch, single_rows

    packing = config.packing and config.method not in PROMPT_METHODS
    rows = pack_examples(tokenized, config.max_length) if packing else single_rows(tokenized)
    if not rows:
        return 0.0, 0, 0
    batches = plan_epoch(
        rows, config.batch_size, config.seed, 0, group_by_length=groups_by_length(config)
    )
    real = sum(len(r) for r in rows)
    padded = sum(len(b) * max(len(rows[i]) for i in b) for b in batches)
    return 1 - real / padded, real, padded


def check_padding(view: DataView, config: Any) -> list[Finding]:
    share, real, padded = padding_share(view.tokenized, config)
    if share < NOTABLE * 2.5:
        return []
    lengths = [len(t.input_ids) for t in view.tokenized]
    if config.packing:
        fix = (
            f"lower batch_size (now {config.batch_size}) or max_length (now {config.max_length}) "
            "so rows fill"
        )
    else:
        fix = (
            "turn packing on (packing: true, the default): short examples then share rows and "
            f"no compute is spent on padding; or lower batch_size (now {config.batch_size})"
        )
    return [
        Finding(
            "padding",
            "warning" if share >= MOST else "info",
            "Most compute is spent on padding" if share >= MOST else "Much compute is padding",
            f"{share:.0%} of the tokens in an epoch's batches are padding ({padded - real:,} of "
            f"{padded:,}); packing {'on' if config.packing else 'off'}, batch_size "
            f"{config.batch_size}, examples {min(lengths)}-{max(lengths)} tokens (median "
            f"{statistics.median(lengths):g}).",
            fix + ".",
        )
    ]


def _first_difference(a: str, b: str) -> str:
    for number, (line_a, line_b) in enumerate(
        zip(a.splitlines(), b.splitlines(), strict=False), start=1
    ):
        if line_a != line_b:
            return f"line {number}: run has {line_a[:60]!r}, base model has {line_b[:60]!r}"
    return f"the run's template is {len(a)} characters, the base model's {len(b)}"


def check_chat_template(
    run_tokenizer: Any, info: dict[str, Any], base_tokenizer: Any | None, view: DataView | None
) -> list[Finding]:
    """Training and inference must render prompts with the same template."""
    chat = info.get("chat")
    run_template = getattr(run_tokenizer, "chat_template", None)
    base_template = getattr(base_tokenizer, "chat_template", None) if base_tokenizer else None
    if chat and not run_template:
        return [
            Finding(
                "chat_template_missing",
                "error",
                "Trained with a chat template, but the run folder has none",
                "run_info.json says chat: true, but the run's tokenizer has no chat_template "
                "(chat_template.jinja is missing).",
                "copy chat_template.jinja from the base model folder into the run folder; "
                "without it inference renders prompts differently from training.",
            )
        ]
    if chat and run_template and base_template and run_template != base_template:
        return [
            Finding(
                "chat_template_changed",
                "warning",
                "The base model's chat template differs from the one the run trained with",
                _first_difference(run_template, base_template) + ".",
                "tunelab generate/chat/merge/export use the run folder's template (the one it "
                "trained with); anything that loads the base model's tokenizer instead renders "
                "prompts differently. Serve from the run folder's tokenizer, or retrain.",
            )
        ]
    trained_pairs = view is not None and any(e.kind != "text" for e in view.examples)
    if chat is False and (run_template or base_template) and trained_pairs:
        return [
            Finding(
                "chat_template_unused",
                "warning",
                "Trained without the chat template the model has",
                "run_info.json says chat: false (chat_format plain), but the tokenizer has a chat "
                "template and the data are prompt/completion pairs; chat front-ends (llama.cpp, "
                "Ollama, a GGUF export) wrap prompts in that template at inference.",
                "train with chat_format: auto (the default) so training and chat inference match, "
                "or serve it as plain completion (tunelab generate does this for the run).",
            )
        ]
    return []


def _describe_token(tokenizer: Any, token_id: int) -> str:
    return f"{tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})"


def check_eos_label(
    run_tokenizer: Any, trained_by_tunelab: bool, view: DataView | None, config: Any | None
) -> list[Finding]:
    """Pad = EOS is fine only when labels come from a mask, not from ``input_ids != pad``."""
    pad_id, eos_id = run_tokenizer.pad_token_id, run_tokenizer.eos_token_id
    if eos_id is None:
        return []
    if pad_id is not None and pad_id != eos_id:
        return []
    same = f"pad token = EOS token = {_describe_token(run_tokenizer, eos_id)}"
    if pad_id is None:
        same = f"no pad token, so EOS {_describe_token(run_tokenizer, eos_id)} pads"
    if trained_by_tunelab and view is not None and config is not None and view.tokenized:
        return _tunelab_eos_probe(run_tokenizer, view, same)
    if trained_by_tunelab and config is not None and config.objective != "sft":
        # preference pairs are not re-read (they are not SFT data); their answers' labels are
        # spans ending with EOS (data.preference._tokenize_answer), never input_ids != pad
        return [
            Finding(
                "pad_is_eos",
                "info",
                "Pad token equals EOS (harmless here)",
                f"{same}; {config.objective} training labels each answer by its span, with the "
                "token that closes it (EOS, or the chat template's end of turn), so padding "
                "never hides it and the model keeps learning to end its answers.",
                "nothing to do: tunelab builds labels from masks, not from input_ids != pad. "
                "Other trainers may mask EOS when pad = EOS.",
            )
        ]
    # a folder trained elsewhere: probe transformers' usual collator, which many scripts use
    from transformers import DataCollatorForLanguageModeling

    probe = run_tokenizer("An answer.", add_special_tokens=False)["input_ids"] + [eos_id]
    if run_tokenizer.pad_token is None:
        run_tokenizer.pad_token = run_tokenizer.eos_token
    labels = DataCollatorForLanguageModeling(run_tokenizer, mlm=False)([{"input_ids": probe}])[
        "labels"
    ][0].tolist()
    if labels[-1] != -100:
        return []
    return [
        Finding(
            "eos_masked",
            "warning",
            "Pad token equals EOS: a pad-masking collator hides EOS from the loss",
            f"{same}; probe 'An answer.<EOS>' through DataCollatorForLanguageModeling gives label "
            f"{labels[-1]} for the EOS position, so a model trained that way never learns to "
            "stop (answers run on to max_new_tokens).",
            "give the tokenizer its own pad token (tokenizer.pad_token = '<pad>' with "
            "add_special_tokens, or an unused token) or build labels from a completion mask; "
            "tunelab's own training keeps EOS in the labels.",
        )
    ]


def _tunelab_eos_probe(tokenizer: Any, view: DataView, same: str) -> list[Finding]:
    from tunelab.data.tokenize import IGNORE_INDEX

    index = next((i for i, t in enumerate(view.tokenized) if not t.truncated), None)
    if index is None:
        return []  # every example is truncated; the truncation finding covers it
    example, tokenized = view.examples[index], view.tokenized[index]
    labelled = [label for label in tokenized.labels if label != IGNORE_INDEX]
    eos = tokenizer.eos_token_id
    if eos in labelled:
        return [
            Finding(
                "pad_is_eos",
                "info",
                "Pad token equals EOS (harmless here)",
                f"{same}; probe {example.origin}: EOS is among its {len(labelled)} trained "
                "tokens, so the model learns to end its answers.",
                "nothing to do: tunelab builds labels from masks, not from input_ids != pad. "
                "Other trainers may mask EOS when pad = EOS.",
            )
        ]
    end = labelled[-1] if labelled else None
    shown = _describe_token(tokenizer, end) if end is not None else "nothing"
    return [
        Finding(
            "eos_not_trained",
            "error",
            "Answers are not trained to end with EOS",
            f"{same}; probe {example.origin}: EOS is not among its trained tokens (the last is "
            f"{shown}), so generation does not learn where to stop.",
            "use a chat template whose assistant turn ends with the EOS token, or set the "
            "tokenizer's eos_token to the template's end-of-turn token and save it with the "
            "model.",
        )
    ]


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
