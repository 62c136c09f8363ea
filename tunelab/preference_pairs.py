"""``tunelab data pairs``: preference pairs from prompt/completion data and a model's own answers.

The reference completion is ``chosen``; the model's sampled answer to the same prompt is
``rejected`` (DPO against the model's own mistakes). Generation is batched; pairs are appended
to the output file batch by batch, so an interrupted run continues where it stopped. Every row
records the model that wrote its rejected answer (``rejected_model``) and the row it came from
(``source``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.config import FineTuningConfig
from tunelab.data.dedup import exact_key
from tunelab.data.schema import Example
from tunelab.data.tokenize import as_messages, render_chat
from tunelab.errors import TunelabError


def _prompt_and_reference(example: Example) -> tuple[str | list[dict[str, str]], str]:
    if example.kind == "prompt_completion":
        return example.prompt or "", example.completion or ""
    if example.kind == "messages" and example.messages and len(example.messages) > 1:
        if example.messages[-1]["role"] == "assistant":
            return example.messages[:-1], example.messages[-1]["content"]
    raise TunelabError(
        f"{example.origin}: pairs need a prompt and a reference answer (prompt/completion, or a "
        "conversation ending with the assistant's answer); this row has neither. Use "
        "prompt_template/completion_template to map other columns."
    )


def _done_rows(out: Path, model_id: str) -> set[str]:
    """Sources already paired in ``out`` by the same model; a cut-off last line is dropped."""
    if not out.exists():
        return set()
    text = out.read_text(encoding="utf-8")
    lines = text.split("\n")
    done: set[str] = set()
    good_chars = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good_chars += len(line) + 1
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # a last line cut short after rows of ours is a crash's: ours, redone. A file of
            # no such rows is not ours to cut, even a one-line one
            if number == len(lines) and done:
                break
            raise TunelabError(
                f"{out}:{number} is not a JSON line, so {out} is not a pairs file this command "
                "wrote. Choose another --out."
            ) from None
        if not isinstance(row, dict) or "rejected_model" not in row or "source" not in row:
            raise TunelabError(
                f"{out}:{number} has no rejected_model/source, so {out} is not a pairs file "
                "this command wrote; it is left alone. Choose another --out."
            )
        if row["rejected_model"] != model_id:
            raise TunelabError(
                f"{out} holds pairs whose rejected answers {row['rejected_model']} wrote, not "
                f"{model_id}. Use another --out for this model (one file, one model)."
            )
        done.add(row["source"])
        good_chars += len(line) + 1
    if good_chars < len(text):
        with out.open("r+", encoding="utf-8") as handle:
            handle.truncate(len(text[:good_chars].encode("utf-8")))
    return done


def make_pairs(
    config: FineTuningConfig,
    model: str,
    out: str | Path,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    limit: int | None = None,
    precision: str = "fp32",
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write prompt/chosen/rejected rows for the prompt/completion data of ``config`` to
    ``out``, the rejected answers sampled from ``model`` (a run folder or a model name).
    Returns counts: written now, already there, skipped (answer equal to the reference)."""
    from tunelab.data.prepare import prepare_examples
    from tunelab.generation import generate, generate_from_text, load_for_inference

    # the data stage's cleaned rows: the chosen answers are what SFT trained on
    whole = dataclasses.replace(config, eval_path=None, eval_split=0.0, objective="sft")
    examples = prepare_examples(whole).train[:limit]
    items = [(e.origin, *_prompt_and_reference(e)) for e in examples]
    out = Path(out)
    loaded = load_for_inference(model, precision=precision)
    model_id = str(Path(loaded.source).resolve()) if Path(loaded.source).exists() else model
    done = _done_rows(out, model_id)
    todo = [item for item in items if item[0] not in done]
    progress(f"{len(items)} prompts, {len(items) - len(todo)} already paired in {out}; "
             f"sampling {len(todo)} answers from {model_id}.")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with out.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=True,
                           temperature=temperature, top_p=top_p, seed=seed + start,
                           batch_size=batch_size)  # fmt: skip
            plain = [p for _, p, _ in batch if isinstance(p, str)]
            # a conversation's prompt as training renders it (system prompt, template limits),
            # as generate renders a plain one
            texts = [
                render_chat(loaded.tokenizer, as_messages(Example("", messages=p),
                            loaded.system_prompt), add_generation_prompt=True)
                for _, p, _ in batch
                if not isinstance(p, str)
            ]  # fmt: skip
            plain_answers = iter(generate(loaded, plain, **options) if plain else [])
            chat_answers = iter(generate_from_text(loaded, texts, **options) if texts else [])
            for origin, prompt, reference in batch:
                answer = next(plain_answers if isinstance(prompt, str) else chat_answers)
                if not answer.strip() or exact_key(answer) == exact_key(reference):
                    skipped += 1  # not a pair: nothing to prefer
                    continue
                row: dict[str, Any]
                if isinstance(prompt, str):
                    # a plain prompt is joined to each answer as it stands: the sampled answer
                    # (stripped by generate) gets the reference's joining whitespace, or the
                    # pair would differ in the join, a cue DPO learns instead of the content
                    join = reference[: len(reference) - len(reference.lstrip())]
                    row = {"prompt": prompt, "chosen": reference, "rejected": join + answer}
                else:
                    row = {
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": reference}],
                        "rejected": [{"role": "assistant", "content": answer}],
                    }
                row.update(rejected_model=model_id, source=origin)
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            handle.flush()  # a batch at a time: an interruption loses at most one batch
            progress(f"  {min(start + batch_size, len(todo))}/{len(todo)} prompts")
    return {"written": written, "already_there": len(items) - len(todo), "skipped": skipped,
            "rejected_model": model_id, "out": str(out)}  # fmt: skip
