"""Held-out preference accuracy and reward margin of base, SFT and preference-tuned models.

For each held-out pair every system scores both answers (summed log-probability of the
answer tokens, as DPO does). Two views:

- ``logp_accuracy`` / ``logp_margin``: how often the system itself finds the chosen answer
  more likely than the rejected one, and by how much (nats) - comparable across all systems;
- ``reward_accuracy`` / ``reward_margin``: TRL's ``rewards/accuracies`` and
  ``rewards/margins``, the implicit DPO reward ``beta * (log p_system - log p_base)`` of the
  chosen answer over the rejected one; 0 for the base model by definition.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.files import atomic_write_json, atomic_write_text
from tunelab.run_folder import config_path


@torch.no_grad()
def pair_logps(
    model: Any, units: list[Any], batch_size: int = 8
) -> tuple[list[float], list[float]]:
    """(chosen, rejected) summed answer log-probabilities of each unit, in unit order."""
    from tunelab.training.logprobs import sequence_logprobs
    from tunelab.training.preference import _batch, ignores_position_ids, pack_units

    device = str(next(model.parameters()).device)
    rows = pack_units(units, 512)
    scores: dict[tuple[int, str], float] = {}
    model.eval()
    separate = ignores_position_ids(model)
    for start in range(0, len(rows), batch_size):
        batch, index, sequences = _batch(rows[start : start + batch_size], 0, device, separate)
        sums, _ = sequence_logprobs(model, batch, index, len(sequences))
        for sequence, value in zip(sequences, sums.tolist(), strict=True):
            scores[(sequence.unit, sequence.side)] = value
    order = [u.index for u in units]
    return [scores[(i, "chosen")] for i in order], [scores[(i, "rejected")] for i in order]


def _summary(
    chosen: list[float], rejected: list[float], base: tuple[list[float], list[float]] | None,
    beta: float,
) -> dict[str, float]:  # fmt: skip
    n = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    out = {
        "pairs": n,
        "logp_accuracy": round(sum(m > 0 for m in margins) / n, 4),
        "logp_margin": round(sum(margins) / n, 4),
    }
    if base is not None:
        base_margins = [c - r for c, r in zip(*base, strict=True)]
        rewards = [beta * (m - b) for m, b in zip(margins, base_margins, strict=True)]
        out["reward_accuracy"] = round(sum(r > 0 for r in rewards) / n, 4)
        out["reward_margin"] = round(sum(rewards) / n, 4)
    return out


def preference_examples(config: Any, path: str, limit: int | None) -> list[Any]:
    """The held-out pairs of ``path`` (cleaned as the run's data was), the first ``limit``;
    TunelabError when it holds none. A KTO run's unpaired rows are paired by prompt: the first
    completion labelled true with the first labelled false (paired rows unpair and re-pair
    exactly)."""
    from tunelab.data.preference import (
        PreferenceExample,
        clean_preference,
        load_preference_examples,
    )

    if config.objective == "kto":
        rows = clean_preference(load_preference_examples(path, config), config, Counter())
        by_prompt: dict[str, dict[bool, Any]] = {}
        for row in rows:
            by_prompt.setdefault(repr(row.prompt), {}).setdefault(bool(row.label), row)
        examples = [
            PreferenceExample(
                sides[True].origin,
                sides[True].prompt,
                sides[True].completion,
                sides[False].completion,
            )
            for sides in by_prompt.values()
            if True in sides and False in sides
        ]
        if not examples:
            raise TunelabError(
                f"{path} has no prompt with both a completion labelled true and one labelled "
                f"false ({len(rows)} rows read), so there is no pair to measure preference "
                "accuracy on. Add a good and a bad completion of the same prompts, or "
                "prompt/chosen/rejected rows."
            )
    else:
        paired = type(config)(**{**config.to_dict(), "objective": "dpo", "label_smoothing": 0.0})
        examples = clean_preference(load_preference_examples(path, paired), paired, Counter())
    examples = examples[:limit] if limit else examples
    if not examples:
        raise TunelabError(f"{path} holds no preference pairs to evaluate.")
    return examples


def score_preference(
    loaded: Any, config: Any, path: str, examples: list[Any], sft_model: Any = None,
    batch_size: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """The preference report of ``examples`` scored by the base (``loaded``'s adapter off),
    the SFT model ``sft_model`` (when given) and the tuned model (adapter on)."""
    from tunelab.data.preference import tokenize_preference

    units = tokenize_preference(
        examples, loaded.tokenizer, config.max_length, loaded.chat, loaded.system_prompt
    )
    model = loaded.model
    with model.disable_adapter():
        base = pair_logps(model, units, batch_size)
    systems = {"base": _summary(*base, None, config.beta)}
    if sft_model is not None:
        systems["sft"] = _summary(*pair_logps(sft_model, units, batch_size), base, config.beta)
    systems["tuned"] = _summary(*pair_logps(model, units, batch_size), base, config.beta)
    return {"eval_path": path, "objective": config.objective, "beta": config.beta,
            "systems": systems}  # fmt: skip


def write_preference_files(report: dict[str, Any], out: Path) -> None:
    """eval_preference.json and eval_preference.md in ``out``, recorded in its manifest; a
    file of the same name that tunelab did not write is refused (TunelabError)."""
    from tunelab.ownership import check_output_files, record_files
    from tunelab.run_folder import EVAL_PREFERENCE_FILES

    check_output_files(out, EVAL_PREFERENCE_FILES, "eval")
    out.mkdir(parents=True, exist_ok=True)
    json_file, markdown_file = (out / name for name in EVAL_PREFERENCE_FILES)
    atomic_write_json(json_file, report)
    atomic_write_text(markdown_file, format_preference_table(report))
    record_files(out, "report", [json_file, markdown_file])


def evaluate_preference_run(
    target: str | Path,
    eval_path: str | Path | None = None,
    sft_run: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score held-out pairs with the base model, the SFT run ``sft_run`` (when given) and
    the tuned run; writes eval_preference.json and eval_preference.md to ``out_dir`` (default:
    the run folder) and returns the report (``systems``: name -> summary). ``tunelab eval``
    gets the same table inside its full report from ``evaluate_run``."""
    from tunelab.generation import load_for_inference
    from tunelab.runs.checks import resolve_run_dir

    folder, config = resolve_run_dir(target)
    path = str(eval_path or config.eval_path or "")
    if not path:
        raise TunelabError(
            f"no held-out pairs: pass --eval-path FILE (prompt/chosen/rejected rows); the run's "
            f"config {config_path(folder)} has no eval_path."
        )
    examples = preference_examples(config, path, limit)
    from tunelab.ownership import check_output_files
    from tunelab.run_folder import EVAL_PREFERENCE_FILES

    # before the scoring's minutes: the files must not replace anything tunelab did not write
    check_output_files(Path(out_dir or folder), EVAL_PREFERENCE_FILES, "eval", announce=False)
    loaded = load_for_inference(str(folder), precision=precision)
    sft = load_for_inference(str(sft_run), precision=precision) if sft_run is not None else None
    report = score_preference(
        loaded, config, path, examples, sft.model if sft else None, batch_size
    )
    write_preference_files(report, Path(out_dir or folder))
    return report


def format_preference_table(report: dict[str, Any]) -> str:
    lines = [
        f"# Held-out preference pairs ({report['eval_path']})",
        "",
        "| system | pairs | log-prob accuracy | log-prob margin | reward accuracy | "
        "reward margin |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["systems"].items():
        lines.append(
            f"| {name} | {s['pairs']} | {s['logp_accuracy']:.1%} | {s['logp_margin']:.3f} | "
            + (
                f"{s['reward_accuracy']:.1%} | {s['reward_margin']:.3f} |"
                if "reward_margin" in s
                else "- | - |"
            )  # fmt: skip
        )
    lines.append("")
    lines.append(
        f"Rewards are TRL's: beta ({report['beta']}) x the log-prob margin's gain over the base."
    )
    return "\n".join(lines) + "\n"


def answer_items(config: Any, eval_path: str, limit: int | None) -> tuple[list[Any], list[Any]]:
    """(held-out items, training pool) of a preference run for the answer evaluation: each
    row's prompt as the question and the answer it teaches as the reference (``chosen``, or a
    KTO completion labelled true; rejected and false-labelled answers are no reference). Data
    cleaned and split as in training. TunelabError when the eval file gives no item."""
    import dataclasses

    from tunelab.data.preference import prepare_preference
    from tunelab.evaluation.systems import EvalItem

    def items(examples: list[Any]) -> list[EvalItem]:
        out = []
        for example in examples:
            answer = example.chosen if example.completion is None else example.completion
            if answer is None or example.label is False:
                continue
            question = _last(example.prompt, "user")
            reference = _last(answer, "assistant")
            if question and reference:
                out.append(EvalItem(question, reference, example.origin))
        return out

    prepared = prepare_preference(dataclasses.replace(config, eval_path=str(eval_path)))
    held_out = items(prepared.eval)
    if not held_out:
        raise TunelabError(
            f"{eval_path}: no row has a prompt and an answer to use as the reference "
            f"({len(prepared.eval)} rows read). The answer evaluation of a preference run needs "
            "prompt/chosen/rejected rows, or KTO rows with completions labelled true."
        )
    return held_out[:limit] if limit else held_out, items(prepared.train)


def _last(text: Any, role: str) -> str:
    """A plain text as it is; of a conversation, the content of its last ``role`` turn."""
    if isinstance(text, str):
        return text
    return next((m["content"] for m in reversed(text) if m["role"] == role), "")


def preference_verdict(report: dict[str, Any]) -> str:
    """One verdict sentence: how often each model prefers the chosen answer."""
    systems = report["systems"]
    n = systems["tuned"]["pairs"]
    others = ", ".join(
        f"{name} {s['logp_accuracy']:.0%}" for name, s in systems.items() if name != "tuned"
    )
    tuned = systems["tuned"]
    return (
        f"On {n} held-out pairs the tuned model finds the chosen answer more likely than the "
        f"rejected one in {tuned['logp_accuracy']:.0%} of pairs ({others}); its reward "
        f"accuracy is {tuned['reward_accuracy']:.0%}, mean reward margin "
        f"{tuned['reward_margin']:.3f}."
    )


def is_preference_run(folder: Path) -> bool:
    from tunelab.run_folder import read_saved_config

    return read_saved_config(folder).get("objective", "sft") != "sft"
