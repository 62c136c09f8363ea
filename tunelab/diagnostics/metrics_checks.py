"""Problems visible in a run's numbers alone: metrics.jsonl lines and results.json.

Each check takes the train lines (``{"step", "loss", "lr", "grad_norm", ...}``), the eval lines
(``{"step", "eval_loss"}``, step 0 = the base model) and the run's config as a plain dict, and
returns findings with the steps and numbers that show the problem.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sized
from typing import Any

from tunelab.diagnostics.divergence import divergence_advice, divergence_evidence
from tunelab.diagnostics.findings import Finding
from tunelab.diagnostics.preference_checks import preference_findings

Record = dict[str, Any]

DIVERGING_RISE = 1.25  # the last fifth of the losses averages 25% above the first fifth
FLAT_DROP = 0.02  # less than a 2% fall from the first fifth to the last: nothing was learned
FLAT_MIN_STEPS = 8  # fewer logged steps than this cannot tell flat from noisy
OVERFIT_RISE = 0.02  # eval loss 2% above its best while train loss still falls
GRAD_SPIKE_FACTOR = 5.0  # a gradient norm 5x the run's median is a spike
MIN_LOSS_TOKEN_SHARE = 0.02
HIGH_LR = 1e-2  # an adapter's rate this high saturates it rather than training it


def _window(values: Sized) -> int:
    return max(1, len(values) // 5)


def _config_has(key: str) -> bool:
    from tunelab.config import FineTuningConfig

    return key in {f.name for f in dataclasses.fields(FineTuningConfig)}


def check_non_finite(train: list[Record], config: Record) -> list[Finding]:
    """A NaN or infinite loss or gradient norm anywhere in the log."""
    for record in train:
        for key in ("loss", "grad_norm"):
            value = record.get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                precision = config.get("precision", "auto")
                cause = (
                    "precision fp16 overflows easily: use precision: bf16 or fp32"
                    if precision == "fp16"
                    else f"lower learning_rate (it is {config.get('learning_rate')}; try a third)"
                )
                return [
                    Finding(
                        "loss_nan",
                        "error",
                        f"{'Loss' if key == 'loss' else 'Gradient norm'} became {value}",
                        f"{key} = {value} at step {record.get('step')} "
                        f"(learning rate {record.get('lr')}, precision {precision}).",
                        f"{cause}; keep max_grad_norm > 0 (clipping) and a warm-up "
                        "(warmup_ratio 0.1). Resume is pointless: the weights after this step "
                        "are NaN; start again from the last checkpoint before it or from scratch.",
                    )
                ]
    return []


def _finite_losses(train: list[Record]) -> list[tuple[int, float]]:
    return [
        (int(r["step"]), float(r["loss"]))
        for r in train
        if isinstance(r.get("loss"), int | float) and math.isfinite(r["loss"])
    ]


def check_diverging(train: list[Record], config: Record) -> list[Finding]:
    """Training loss that ends well above where it started."""
    losses = _finite_losses(train)
    if len(losses) < 4:
        return []
    w = _window(losses)
    head = statistics.fmean(v for _, v in losses[:w])
    tail = statistics.fmean(v for _, v in losses[-w:])
    if tail <= head * DIVERGING_RISE:
        return []
    peak_step, peak = max(losses, key=lambda item: item[1])
    lr = config.get("learning_rate")
    return [
        Finding(
            "loss_diverging",
            "error",
            "Training loss is diverging",
            f"mean train loss rose from {head:.4f} (steps {losses[0][0]}-{losses[w - 1][0]}) to "
            f"{tail:.4f} (steps {losses[-w][0]}-{losses[-1][0]}), peak {peak:.4f} at step "
            f"{peak_step}; learning_rate {lr}, precision {config.get('precision')}.",
            f"lower learning_rate (e.g. --set learning_rate={_third(lr)}), keep max_grad_norm at "
            "1.0, lengthen the warm-up (warmup_ratio 0.1); with precision fp16 switch to bf16 or "
            "fp32.",
        )
    ]


def check_divergence(train: list[Record], config: Record, vocab_size: int | None) -> list[Finding]:
    """Divergence visible in a single line: a loss above the uniform-guess level ln(vocab),
    an exploded gradient norm, or a loss twice where the run started (divergence.py); with a
    curve long enough, the windowed rise of ``check_diverging`` leads the evidence. The fix
    names the run's learning rate and the method's usual range."""
    losses = _finite_losses(train)
    norms = [
        (int(r["step"]), float(r["grad_norm"]))
        for r in train
        if isinstance(r.get("grad_norm"), int | float) and math.isfinite(r["grad_norm"])
    ]
    windowed = check_diverging(train, config)
    evidence = divergence_evidence(losses, norms, vocab_size, rise=not windowed)
    if evidence is None and not windowed:
        return []
    lr, method = config.get("learning_rate"), str(config.get("method", "lora"))
    parts = [windowed[0].evidence.rstrip(".")] if windowed else []
    if evidence is None:
        parts.append(f"learning_rate {lr}, method {method}")
    else:
        parts.append(f"{evidence}; learning_rate {lr}, method {method}")
    return [
        Finding(
            "loss_diverging",
            "error",
            "Training is diverging",
            "; ".join(parts) + ".",
            divergence_advice(lr, method),
        )
    ]


def _third(lr: Any) -> str:
    return f"{float(lr) / 3:.1e}" if isinstance(lr, int | float) else "1e-4"


def check_flat(train: list[Record], results: Record, config: Record) -> list[Finding]:
    """Training loss that hardly moves (and eval loss that does not improve either)."""
    losses = _finite_losses(train)
    if len(losses) < FLAT_MIN_STEPS:
        return []
    w = _window(losses)
    head = statistics.fmean(v for _, v in losses[:w])
    tail = statistics.fmean(v for _, v in losses[-w:])
    drop = (head - tail) / head if head else 0.0
    if drop >= FLAT_DROP or tail > head * DIVERGING_RISE:
        return []
    initial, best = results.get("initial_eval_loss"), results.get("best_eval_loss")
    eval_note = ""
    if isinstance(initial, int | float) and isinstance(best, int | float):
        if initial and (initial - best) / initial >= FLAT_DROP:
            return []  # eval improved: a flat train curve is then noise, not a failure
        eval_note = f"; eval loss {initial:.4f} (base) -> best {best:.4f}"
    causes = []
    lr = config.get("learning_rate")
    lrs = [r["lr"] for r in train if isinstance(r.get("lr"), int | float)]
    if lrs and max(lrs) == 0:
        causes.append("the learning rate was 0 at every logged step: check the schedule")
    elif isinstance(lr, int | float) and lr < 1e-5:
        causes.append(f"learning_rate {lr} is too low for adapters; LoRA usually needs 1e-4-1e-3")
    elif isinstance(lr, int | float) and lr >= HIGH_LR:
        causes.append(
            f"learning_rate {lr} is far above the usual 1e-4-1e-3: steps that large saturate the "
            "adapter and the loss stalls; lower it to 1e-3"
        )
    trainable = results.get("trainable_parameters")
    if trainable == 0:
        causes.append("no parameter was trainable: target_modules matched nothing")
    share = _loss_token_share(results)
    if share is not None and share < MIN_LOSS_TOKEN_SHARE:
        causes.append(f"the loss covered only {share:.1%} of the tokens (see the loss mask)")
    causes.append(
        f"target_modules {config.get('target_modules')} may be too few: try ['all-linear']"
    )
    usual = isinstance(lr, int | float) and 1e-5 <= lr < HIGH_LR
    if usual and not (lrs and max(lrs) == 0):
        causes.append(f"or raise learning_rate (now {lr}) by 3x")
    return [
        Finding(
            "loss_flat",
            "warning",
            "Training loss is flat",
            f"mean train loss {head:.4f} (steps {losses[0][0]}-{losses[w - 1][0]}) -> "
            f"{tail:.4f} (steps {losses[-w][0]}-{losses[-1][0]}), a {drop:.1%} change over "
            f"{len(losses)} logged steps{eval_note}.",
            "; ".join(causes) + ".",
        )
    ]


def _loss_token_share(results: Record) -> float | None:
    tokens, loss_tokens = results.get("train_tokens"), results.get("train_loss_tokens")
    if isinstance(tokens, int) and isinstance(loss_tokens, int) and tokens > 0:
        return loss_tokens / tokens
    return None


def check_loss_mask(results: Record) -> list[Finding]:
    """A loss mask that covers no tokens, or leaves many examples without any."""
    findings = []
    share = _loss_token_share(results)
    if share is not None and share < MIN_LOSS_TOKEN_SHARE:
        findings.append(
            Finding(
                "loss_mask_empty",
                "error" if results.get("train_loss_tokens") == 0 else "warning",
                "The loss mask covers (almost) no tokens",
                f"train_loss_tokens {results['train_loss_tokens']:,} of train_tokens "
                f"{results['train_tokens']:,} ({share:.2%}) in results.json.",
                "the completions or assistant turns are empty or cut off: check the data's "
                "completion/assistant fields (tunelab data preview CONFIG), and raise max_length "
                "if prompts fill it.",
            )
        )
    data = results.get("data") or {}
    empty, examples = data.get("examples_without_loss_tokens"), data.get("examples")
    if isinstance(empty, int) and isinstance(examples, int) and empty and examples:
        findings.append(
            Finding(
                "examples_without_loss_tokens",
                "warning" if empty / examples >= 0.1 else "info",
                "Some examples have no token to learn from",
                f"{empty} of {examples} training examples have no loss token "
                "(results.json data.examples_without_loss_tokens).",
                "their prompt fills max_length or their completion is empty: raise max_length "
                "or drop them (min_tokens, or fix the data).",
            )
        )
    return findings


def check_overfitting(train: list[Record], evals: list[Record], config: Record) -> list[Finding]:
    """Eval loss rising from its best while train loss keeps falling."""
    points = [
        (int(r["step"]), float(r["eval_loss"]))
        for r in evals
        if isinstance(r.get("eval_loss"), int | float) and math.isfinite(r["eval_loss"])
    ]
    if len(points) < 2:
        return []
    best_step, best = min(points, key=lambda p: p[1])
    last_step, last = points[-1]
    if last_step <= best_step or last <= best * (1 + OVERFIT_RISE):
        return []
    losses = _finite_losses(train)
    near_best = [v for s, v in losses if s <= max(best_step, losses[0][0] if losses else 0)]
    after = [v for s, v in losses if s > best_step]
    if not near_best or not after:
        return []
    train_then = near_best[-1]
    train_end = statistics.fmean(after[-_window(after) :])
    if train_end >= train_then:
        return []
    epochs = [r.get("epoch") for r in train if r.get("step") == best_step]
    fixes = []
    if best_step == 0:
        fixes.append("training made held-out loss worse than the base model from the start")
    elif epochs and isinstance(epochs[0], int | float):
        best_epoch = epochs[0]
        fixes.append(
            f"train fewer epochs (best at epoch {best_epoch:g}: num_epochs {_ceil(best_epoch)})"
        )
    else:
        fixes.append(f"stop earlier (max_steps {best_step})")
    fixes.append(
        f"raise lora_dropout (now {config.get('lora_dropout')}) or lower lora_r "
        f"(now {config.get('lora_r')})"
    )
    fixes.append("add more (or more varied) training data")
    if _config_has("early_stopping_patience"):
        fixes.append("set early_stopping_patience: 2 to stop automatically")
    return [
        Finding(
            "overfitting",
            "warning",
            "Eval loss rises while train loss falls (overfitting)",
            f"eval loss was best at step {best_step} ({best:.4f}) and rose to {last:.4f} by step "
            f"{last_step} (+{(last - best) / best:.1%}), while train loss fell from "
            f"{train_then:.4f} to {train_end:.4f}.",
            "; ".join(fixes) + ".",
        )
    ]


def _ceil(value: float) -> int:
    return max(1, math.ceil(value))


def check_no_eval(evals: list[Record]) -> list[Finding]:
    if any(r.get("step", 0) > 0 for r in evals):
        return []
    return [
        Finding(
            "no_eval",
            "info",
            "No held-out evaluation",
            "metrics.jsonl has no eval_loss line after step 0.",
            "set eval_path (or eval_split: 0.1) so overfitting and the gain over the base model "
            "can be seen.",
        )
    ]


def check_grad_spikes(
    train: list[Record], config: Record, factor: float = GRAD_SPIKE_FACTOR
) -> list[Finding]:
    """Gradient norms far above the run's median (pre-clipping norms are logged)."""
    norms = [
        (int(r["step"]), float(r["grad_norm"]))
        for r in train
        if isinstance(r.get("grad_norm"), int | float) and math.isfinite(r["grad_norm"])
    ]
    if len(norms) < 5:
        return []
    median = statistics.median(v for _, v in norms)
    if median <= 0:
        return []
    spikes = [(s, v) for s, v in norms if v > factor * median]
    if not spikes:
        return []
    shown = ", ".join(f"step {s}: {v:.3g}" for s, v in spikes[:6])
    more = f" and {len(spikes) - 6} more" if len(spikes) > 6 else ""
    clip = config.get("max_grad_norm")
    clip_fix = (
        "turn clipping on (max_grad_norm: 1.0)"
        if clip in (0, 0.0, None)
        else f"clipping at {clip} capped these updates"
    )
    return [
        Finding(
            "grad_norm_spikes",
            "warning",
            "Gradient norm spikes",
            f"{len(spikes)} of {len(norms)} logged steps have a gradient norm over "
            f"{factor:g}x the median {median:.3g} ({shown}{more}).",
            f"{clip_fix}; lower learning_rate (now {config.get('learning_rate')}) or lengthen the "
            "warm-up; look for outlier examples (very long, garbled or duplicated text) with "
            "tunelab data inspect.",
        )
    ]


def check_unfinished(train: list[Record], results: Record | None, config: Record) -> list[Finding]:
    if results is not None:
        return []
    last = max((int(r["step"]) for r in train), default=0)
    return [
        Finding(
            "run_unfinished",
            "warning",
            "The run did not finish",
            f"no results.json; the last logged step is {last}"
            + (f" of max_steps {config['max_steps']}" if config.get("max_steps") else "")
            + ".",
            "continue it with: tunelab train CONFIG --resume (it restarts from the last "
            "checkpoint), or look at the end of the training output for the error.",
        )
    ]


def metrics_findings(
    train: list[Record],
    evals: list[Record],
    results: Record | None,
    config: Record,
    vocab_size: int | None = None,
) -> list[Finding]:
    """Every check that needs only the numbers (``vocab_size``: the model's, for the
    uniform-guess level; results.json's ``vocab_size`` when not given)."""
    findings = check_unfinished(train, results, config)
    nan = check_non_finite(train, config)
    findings += nan
    vocab_size = vocab_size or (results or {}).get("vocab_size")
    if not nan:
        findings += check_divergence(train, config, vocab_size)
        findings += check_flat(train, results or {}, config)
    findings += check_loss_mask(results or {})
    findings += check_overfitting(train, evals, config)
    findings += check_no_eval(evals)
    findings += check_grad_spikes(train, config)
    findings += preference_findings(train, config)
    return findings
