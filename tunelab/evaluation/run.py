"""Evaluate a run: every system on the same held-out items, then the report.

``evaluate_run`` is the one entry point (the CLI and the demo call it). It loads the run's
adapter once and switches it off for the systems built on the base model, so base and tuned
share weights, tokenizer and chat template exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError, did_you_mean
from tunelab.evaluation import metrics
from tunelab.evaluation.systems import (
    FEW_SHOT_CHOICES,
    SYSTEMS,
    TUNED_SYSTEMS,
    EvalItem,
    PromptBuilder,
    document,
    to_items,
)

# answer metrics in [0, 1] (shown as points out of 100) and the reference loss (nats, lower wins)
ANSWER_METRICS = ("exact_match", "token_f1", "rouge_l", "chrf", "term_score")
METRICS = (*ANSWER_METRICS, "loss")
_BRACED = re.compile(r"\{([^{}]+)\}")
_STOPWORDS = frozenset(
    "about above after again also because been before being below between both could does "
    "doing down during each from further have having here into itself just more most other "
    "over same should some such than that their theirs them then there these they this "
    "those through under until very were what when where which while will with would your "
    "used uses using usually often called known".split()
)


@dataclass
class SystemResult:
    name: str
    prompts: list[str]
    answers: list[str]
    scores: dict[str, list[float | None]]  # metric -> one value per item
    reference_tokens: int
    reference_nll: float
    generation_seconds: float
    generated_tokens: int
    loss_seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.reference_nll / max(self.reference_tokens, 1), 50.0))

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def seconds_per_answer(self) -> float:
        return self.generation_seconds / max(len(self.answers), 1)


@dataclass
class EvalResults:
    """Everything measured: per-system scores with intervals, paired differences, forgetting,
    the verdict, and the files written."""

    run_dir: str
    eval_path: str
    settings: dict[str, Any]
    items: list[EvalItem]
    systems: dict[str, SystemResult]
    summary: dict[str, dict[str, metrics.Interval]]  # system -> metric -> mean with CI
    differences: list[dict[str, Any]]  # {"first", "second", "metric", "interval"}
    forgetting: dict[str, Any] | None
    training: dict[str, Any]
    verdict: list[str] = field(default_factory=list)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def interval(i: metrics.Interval) -> dict[str, float | None]:
            return {k: (None if math.isnan(v) else round(v, 6)) for k, v in vars(i).items()}

        return {
            "run_dir": self.run_dir,
            "eval_path": self.eval_path,
            "settings": self.settings,
            "examples": len(self.items),
            "seconds": round(self.seconds, 2),
            "systems": {
                name: {
                    **{m: interval(self.summary[name][m]) for m in METRICS},
                    "perplexity": round(s.perplexity, 4),
                    "answer_words": round(
                        sum(len(a.split()) for a in s.answers) / max(len(s.answers), 1), 2
                    ),
                    "tokens_per_second": round(s.tokens_per_second, 2),
                    "seconds_per_answer": round(s.seconds_per_answer, 4),
                    "generation_seconds": round(s.generation_seconds, 2),
                    "loss_seconds": round(s.loss_seconds, 2),
                }
                for name, s in self.systems.items()
            },
            "differences": [
                {**{k: v for k, v in d.items() if k != "interval"}, **interval(d["interval"])}
                for d in self.differences
            ],
            "forgetting": self.forgetting,
            "training": self.training,
            "verdict": self.verdict,
            "items": [
                {
                    "origin": item.origin,
                    "question": item.question,
                    "reference": item.reference,
                    "terms": item.terms,
                    "answers": {name: s.answers[i] for name, s in self.systems.items()},
                }
                for i, item in enumerate(self.items)
            ],
        }


def parse_systems(text: str | list[str]) -> list[str]:
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    for name in names:
        if name not in SYSTEMS:
            raise TunelabError(
                f"--systems: unknown system {name!r}.{did_you_mean(name, SYSTEMS)} Choose from "
                f"{', '.join(SYSTEMS)}, separated by commas."
            )
    if not names:
        raise TunelabError(f"--systems is empty; give some of {', '.join(SYSTEMS)}.")
    return [s for s in SYSTEMS if s in names]  # a fixed order keeps tables comparable


def resolve_run_dir(target: str | Path) -> tuple[Path, Any]:
    """The run folder and its config, from a run folder or the config file that made it."""
    from tunelab.config import load_config

    path = Path(target)
    if path.is_file():
        config = load_config(path)
        run_dir = Path(config.output_dir)
        if not (run_dir / "adapter_config.json").is_file():
            raise TunelabError(
                f"{path} trains into {run_dir}, which holds no finished run (no "
                f"adapter_config.json). Run 'tunelab train {path}' first."
            )
        return run_dir, config
    if not (path / "adapter_config.json").is_file() or not (path / "tunelab_config.yaml").is_file():
        raise TunelabError(
            f"{path} is not a tunelab run folder (expected adapter_config.json and "
            "tunelab_config.yaml in it). Pass the output_dir of a finished 'tunelab train', or "
            "its config file."
        )
    return path, load_config(path / "tunelab_config.yaml")


def key_terms(
    raw_reference: str | None, reference: str, idf: dict[str, float], rare: float
) -> list[str]:
    """The reference's key terms: its ``{braced}`` cross-references when the raw data marks
    them (FOLDOC does), else up to five of its rarest words over the training documents
    (IDF of at least ``rare``; four letters or more, not stop words)."""
    if raw_reference:
        braced = []
        for match in _BRACED.findall(raw_reference):
            term = " ".join(match.split())
            if metrics.normalize(term) and term.lower() not in (t.lower() for t in braced):
                braced.append(term)
        if braced:
            return braced
    candidates = []
    for word in metrics.word_list(reference):
        if len(word) >= 4 and word not in _STOPWORDS and word not in candidates:
            if idf.get(word, math.inf) >= rare:
                candidates.append(word)
    ranked = sorted(candidates, key=lambda w: -idf.get(w, math.inf))
    return [w for w in candidates if w in ranked[:5]]


def _document_idf(documents: list[str]) -> dict[str, float]:
    from collections import Counter

    frequency: Counter[str] = Counter()
    for text in documents:
        frequency.update(set(metrics.word_list(text)))
    n = max(len(documents), 1)
    return {word: math.log(n / df) for word, df in frequency.items()}


def load_items(
    config: Any, eval_path: str, limit: int | None
) -> tuple[list[EvalItem], list[EvalItem]]:
    """(held-out items, training pool), both cleaned as the run's training data was."""
    from tunelab.data.loading import snapshot_pipes
    from tunelab.data.prepare import read_limits

    if not Path(eval_path).exists():
        raise TunelabError(f"--eval-path {eval_path} does not exist. Give a held-out data file.")
    eval_config = dataclasses.replace(config, eval_path=str(eval_path))
    # a pipe is read once here, for both the prepared items and their raw references
    with snapshot_pipes([config.dataset_path, eval_path], read_limits(config)):
        return _load_items(config, eval_config, eval_path, limit)


def _load_items(
    config: Any, eval_config: Any, eval_path: str, limit: int | None
) -> tuple[list[EvalItem], list[EvalItem]]:
    from tunelab.data.prepare import load_examples, prepare_examples

    prepared = prepare_examples(eval_config)
    pool = to_items(prepared.train, config.dataset_path)
    held_out = to_items(prepared.eval or [], str(eval_path))
    if limit is not None:
        held_out = held_out[:limit]
    raw = {e.origin: e for e in load_examples(eval_path, config, eval_data=True)}
    idf = _document_idf([document(p) for p in pool])
    rare = math.log(50)  # in fewer than 2% of the training documents
    for item in held_out:
        original = raw.get(item.origin)
        raw_reference = original.completion if original is not None else None
        item.terms = key_terms(raw_reference, item.reference, idf, rare)
    return held_out, pool


def score_answers(answers: list[str], items: list[EvalItem]) -> dict[str, list[float | None]]:
    scores: dict[str, list[float | None]] = {m: [] for m in ANSWER_METRICS}
    for answer, item in zip(answers, items, strict=True):
        scores["exact_match"].append(metrics.exact_match(answer, item.reference))
        scores["token_f1"].append(metrics.token_f1(answer, item.reference))
        scores["rouge_l"].append(metrics.rouge_l(answer, item.reference))
        scores["chrf"].append(metrics.chrf(answer, item.reference))
        scores["term_score"].append(metrics.term_score(answer, item.terms))
    return scores


def evaluate_run(
    run_dir: str | Path,
    eval_path: str | Path | None = None,
    systems: str | list[str] = SYSTEMS,
    limit: int | None = None,
    k: int = 3,
    retriever: str = "bm25",
    few_shot_choice: str = "similar",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    precision: str = "auto",
    repetition_penalty: float = 1.0,
    context_chars: int = 400,
    bootstrap_samples: int = 1000,
    forgetting: bool = True,
    out_dir: str | Path | None = None,
    shown_answers: int = 8,
    seed: int = 0,
    progress: Any = None,
) -> EvalResults:
    """Evaluate ``systems`` of a run (its folder or config file) on ``eval_path`` (default: the
    run's own eval_path) and write eval_report.html, eval_report.md and eval_results.json to
    ``out_dir`` (default: the run folder)."""
    from tunelab.evaluation.forgetting import general_perplexity
    from tunelab.evaluation.report import write_reports
    from tunelab.evaluation.retrieval import build_retriever
    from tunelab.evaluation.shared_pass import score_and_generate
    from tunelab.evaluation.verdict import comparisons, verdict
    from tunelab.generation import load_for_inference

    started = time.perf_counter()
    progress = progress or (lambda line: print(line, flush=True))
    chosen = parse_systems(systems)
    if few_shot_choice not in FEW_SHOT_CHOICES:
        raise TunelabError(
            f"few-shot choice {few_shot_choice!r} is unknown; use {' or '.join(FEW_SHOT_CHOICES)}."
        )
    if k < 1:
        raise TunelabError(
            f"--k must be at least 1 (got {k}): it is the number of examples or documents."
        )
    if limit is not None and limit < 1:
        raise TunelabError(f"--limit must be at least 1 (got {limit}).")
    folder, config = resolve_run_dir(run_dir)
    eval_path = str(eval_path or config.eval_path or "")
    if not eval_path:
        raise TunelabError(
            f"no held-out data: pass --eval-path FILE (the run's config {folder}/"
            "tunelab_config.yaml has no eval_path)."
        )
    items, pool = load_items(config, eval_path, limit)
    progress(f"Evaluating {', '.join(chosen)} on {len(items)} held-out examples ({eval_path}).")
    needs_pool = any(s in ("few-shot", "rag", "tuned+rag") for s in chosen)
    index = build_retriever(retriever, [document(p) for p in pool]) if needs_pool else None

    loaded = load_for_inference(str(folder), precision=precision)
    builder = PromptBuilder(
        loaded.tokenizer, loaded.chat, loaded.system_prompt, pool, index, k,
        few_shot_choice, context_chars, seed,
    )  # fmt: skip
    results: dict[str, SystemResult] = {}
    general: dict[str, Any] = {}
    for name in chosen:
        rendered = [builder.render(name, item, i) for i, item in enumerate(items)]
        prompts = [p for p, _ in rendered]
        with _adapter(loaded.model, name in TUNED_SYSTEMS):
            losses, generated, loss_seconds = score_and_generate(
                loaded, prompts, [f for _, f in rendered], max_new_tokens, batch_size,
                repetition_penalty,
            )  # fmt: skip
        scores = score_answers(generated.answers, items)
        scores["loss"] = [x.loss for x in losses]
        results[name] = SystemResult(
            name, prompts, generated.answers, scores,
            sum(x.tokens for x in losses), sum(x.nll_sum for x in losses),
            generated.seconds, generated.new_tokens, loss_seconds,
        )  # fmt: skip
        # the mean over examples, as in the report's table and verdict (not token-weighted)
        progress(
            f"  {name:<10} loss {_mean(scores['loss']):.3f}"
            f"  token F1 {100 * _mean(scores['token_f1']):.1f}"
            f"  {generated.tokens_per_second:.0f} tokens/s"
            f"  ({loss_seconds + generated.seconds:.0f} s)"
        )
    for name in ("base", "tuned") if forgetting else ():
        with _adapter(loaded.model, name == "tuned"):
            general[name] = general_perplexity(loaded.model, loaded.tokenizer)

    summary = {
        name: {m: metrics.bootstrap_mean(r.scores[m], bootstrap_samples, seed) for m in METRICS}
        for name, r in results.items()
    }
    differences = comparisons(
        {name: r.scores for name, r in results.items()}, METRICS, bootstrap_samples, seed
    )
    forgetting_info = (
        {
            name: {
                "loss": round(g["loss"], 6),
                "perplexity": round(g["perplexity"], 4),
                "tokens": g["tokens"],
            }
            for name, g in general.items()
        }
        if general
        else None
    )
    training = _training_info(folder)
    settings = {
        "systems": chosen, "limit": limit, "k": k, "retriever": retriever,
        "few_shot_choice": few_shot_choice, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "precision": precision,
        "repetition_penalty": repetition_penalty, "context_chars": context_chars,
        "bootstrap_samples": bootstrap_samples, "seed": seed,
        "model_dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
    }  # fmt: skip
    evaluation = EvalResults(
        str(folder), eval_path, settings, items, results, summary, differences,
        forgetting_info, training,
    )  # fmt: skip
    evaluation.verdict = verdict(
        {name: {m: summary[name][m].mean for m in METRICS} for name in results},
        differences,
        forgetting_info,
        training.get("train_runtime_seconds"),
    )
    evaluation.seconds = time.perf_counter() - started
    evaluation.files = write_reports(evaluation, Path(out_dir or folder), shown_answers)
    progress(f"Report: {evaluation.files['html']} ({evaluation.seconds:.0f} s)")
    return evaluation


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else math.nan


class _adapter:  # noqa: N801 (used as a context manager, reads like one)
    """Switch the run's adapter off for base-model systems (and on again after)."""

    def __init__(self, model: Any, enabled: bool) -> None:
        self.model, self.enabled, self.context = model, enabled, None

    def __enter__(self) -> None:
        if not self.enabled and hasattr(self.model, "disable_adapter"):
            self.context = self.model.disable_adapter()
            self.context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


def _training_info(folder: Path) -> dict[str, Any]:
    """Loss curves and training cost from the run's metrics.jsonl and results.json."""
    train, evaluation = [], []
    log = folder / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the rest of the curve still stands
            if "loss" in row and "step" in row:
                train.append((row["step"], row["loss"]))
            if "eval_loss" in row and "step" in row:
                evaluation.append((row["step"], row["eval_loss"]))
    info: dict[str, Any] = {"train_curve": train, "eval_curve": evaluation}
    results = folder / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        for key in (
            "train_runtime_seconds",
            "steps",
            "train_tokens",
            "eval_loss",
            "initial_eval_loss",
        ):
            if key in data:
                info[key] = data[key]
    return info
