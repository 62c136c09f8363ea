"""The training loop: read it top to bottom.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Each micro-batch's summed
loss is divided by the loss tokens of the whole step, so k micro-batches give exactly the
gradient of one batch k times larger, however the tokens fall between them (or between
processes, when several train together).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError
from tunelab.run_folder import CURVES, metrics_path, read_metrics
from tunelab.training import preference
from tunelab.training.attention import use_packed_attention
from tunelab.training.batching import Row, collate, loss_tokens, plan_epoch
from tunelab.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from tunelab.training.distributed import (
    World,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    init_world,
    shard,
)
from tunelab.training.dropout import fast_adapter_dropout
from tunelab.training.families import FastPathPlan, plan_fast_path
from tunelab.training.guards import catch_interrupt, nan_diagnosis
from tunelab.training.logging import MetricsLog, Progress
from tunelab.training.lora_forward import lean_lora_forward
from tunelab.training.loss import causal_lm_loss_sum, release_scratch, stock_loss
from tunelab.training.neftune import neftune
from tunelab.training.norm import fast_rms_norm
from tunelab.training.optim import build_optimizer
from tunelab.training.precision import backward_precision, grad_scaler, mixed_precision
from tunelab.training.reporting import Reporters, plot_curves
from tunelab.training.rotary import fast_rotary
from tunelab.training.schedule import lr_factor, warmup_steps_for
from tunelab.training.sharding import (
    clip_gradients,
    full_optimizer_state,
    full_state_for_saving,
    is_sharded,
    shard_model,
)


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)  # preference: TRL-named rewards


@torch.no_grad()
def evaluate(
    model: Any,
    rows: list[Row],
    batch_size: int,
    pad_token_id: int,
    device: str = "cpu",
    precision: str = "fp32",
    world: World | None = None,
) -> EvalResult:
    """Token-weighted mean loss (and perplexity) over ``rows`` (split over the processes)."""
    world = world or World()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    mine = shard(batches, world)
    # sharded layers gather their weights in every forward, a collective: every process runs
    # as many forwards, the shorter shares repeating a batch whose loss is not counted
    rounds = -(-len(batches) // world.size) if world.active and is_sharded(model) else len(mine)
    for index in range(rounds):
        batch_rows = mine[index] if index < len(mine) else batches[0]
        with mixed_precision(model, device, precision):
            loss_sum, n = causal_lm_loss_sum(model, _to(collate(batch_rows, pad_token_id), device))
        if index < len(mine):
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    total, count = all_reduce_sum(total, world), int(all_reduce_sum(count, world))
    loss = total / max(count, 1)
    return EvalResult(loss, math.exp(min(loss, 50.0)), count)


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accumulate_gradients(
    model: Any,
    micro_batches: list[list[Row]],
    pad_token_id: int,
    device: str = "cpu",
    precision: str = "fp32",
    step_loss_tokens: int | None = None,
    scaler: Any = None,
    idle_batches: list[list[Row]] | None = None,
) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches; returns the step's mean
    loss and its number of loss tokens.

    Each micro-batch's summed loss is divided by ``step_loss_tokens`` (by default those of
    ``micro_batches``; across processes, those of the whole step), so the accumulated gradient
    equals that of one batch holding all the micro-batches.
    """
    if step_loss_tokens is None:
        step_loss_tokens = sum(loss_tokens(rows) for rows in micro_batches)
    step_loss = 0.0
    for rows in micro_batches:
        with mixed_precision(model, device, precision):
            loss_sum, _ = causal_lm_loss_sum(model, _to(collate(rows, pad_token_id), device))
        loss = loss_sum / max(step_loss_tokens, 1)
        with backward_precision(model, precision):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += float(loss_sum.detach())
    for rows in idle_batches or []:  # forwards and backwards that add nothing (see _fit)
        with mixed_precision(model, device, precision):
            loss_sum, _ = causal_lm_loss_sum(model, _to(collate(rows, pad_token_id), device))
        with backward_precision(model, precision):
            (loss_sum * 0.0).backward()
    return step_loss / max(step_loss_tokens, 1), step_loss_tokens


def steps_per_epoch(num_rows: int, config: FineTuningConfig, processes: int = 1) -> int:
    """Optimizer steps per epoch: each takes gradient_accumulation_steps micro-batches of
    batch_size rows on each of ``processes``."""
    micro_batches = math.ceil(num_rows / config.batch_size)
    return math.ceil(micro_batches / (config.gradient_accumulation_steps * processes))


def total_steps(num_rows: int, config: FineTuningConfig, processes: int = 1) -> int:
    return config.max_steps or steps_per_epoch(num_rows, config, processes) * config.num_epochs


# why a piece the family table allows switched nothing in this model
_NOTHING_TO_SWITCH = {
    "dropout": "lora_dropout is 0 or no adapter dropout",
    "lora_forward": "no plain LoRA layer on nn.Linear",
    "norm": "no frozen Llama-style RMSNorm",
    "rotary": "apply_rotary_pos_emb is not Llama's",
}


@contextmanager
def training_mode(model: Any, config: FineTuningConfig) -> Iterator[FastPathPlan]:
    """Packed attention (no dense mask), cheaper adapter dropout, a leaner LoRA forward,
    hand-written RMSNorm and rotary backwards, the fused loss and gradient checkpointing for
    the run only, each where training.families proves it equal for the model's family and the
    config leaves it on (``fast_path``, ``fast_path_disable``); yields the plan. The model goes
    back to its own attention and modules afterwards, as generation and saving expect them.
    A piece left stock keeps packing correct: transformers masks each packed example from the
    restarting position ids."""
    plan = plan_fast_path(model, config.fast_path, tuple(config.fast_path_disable))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = getattr(getattr(base, "config", None), "_attn_implementation", None)
    switched = config.packing and plan.fast["attention"] and use_packed_attention(base)
    if config.packing and plan.fast["attention"] and not switched:
        plan.fast["attention"] = False
        plan.why["attention"] = f"attn_implementation {previous!r}"
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    switches = {
        "dropout": fast_adapter_dropout,
        "lora_forward": lean_lora_forward,
        "norm": fast_rms_norm,
        "rotary": fast_rotary,
    }
    try:
        with ExitStack() as stack:
            for name, switch in switches.items():
                if plan.fast[name] and stack.enter_context(switch(model)) == 0:
                    plan.fast[name], plan.why[name] = False, _NOTHING_TO_SWITCH[name]
            if not plan.fast["loss"]:
                stack.enter_context(stock_loss())
            stack.enter_context(neftune(model, config.neftune_noise_alpha))
            yield plan
    finally:
        release_scratch()
        if switched:
            base.set_attn_implementation(previous)
        if config.gradient_checkpointing:
            base.gradient_checkpointing_disable()


def fit(
    model: Any,
    train_rows: list[Row],
    eval_rows: list[Row] | None,
    config: FineTuningConfig,
    run_dir: Path,
    pad_token_id: int,
    device: str = "cpu",
    resume: bool = False,
    on_eval: Callable[[int, float], None] | None = None,
    precision: str = "fp32",
    sharded: bool = False,
) -> dict[str, Any]:
    """Train ``model`` (its trainable parameters) on ``train_rows``; returns the run's results.

    ``on_eval(step, eval_loss)`` is called after each evaluation during training; an exception
    it raises (a sweep pruning a trial) stops the run and propagates. ``precision`` is the
    compute precision (bf16/fp16 autocast over fp32 trainable weights, or fp32). ``sharded``:
    split the decoder layers over the processes with FSDP (training.sharding).
    """
    with training_mode(model, config) as plan, catch_interrupt() as interrupt:
        say(init_world(device), plan.summary())
        return _fit(
            model, train_rows, eval_rows, config, Path(run_dir), pad_token_id, device, resume,
            on_eval, precision, interrupt, sharded,
        )  # fmt: skip


def _fit(
    model: Any,
    train_rows: list[Row],
    eval_rows: list[Row] | None,
    config: FineTuningConfig,
    run_dir: Path,
    pad_token_id: int,
    device: str,
    resume: bool,
    on_eval: Callable[[int, float], None] | None,
    precision: str,
    interrupt: Any,
    sharded: bool,
) -> dict[str, Any]:
    world = init_world(device)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if sharded:
        if checkpoint is not None:  # whole weights into the whole model, before it is split
            load_weights(checkpoint, model)
        layers = shard_model(model, device)
        say(world, f"FSDP: {layers} decoder layers sharded over {world.size} processes.")
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_note = build_optimizer(model, config)
    per_epoch = steps_per_epoch(len(train_rows), config, world.size)
    steps = total_steps(len(train_rows), config, world.size)
    warmup = warmup_steps_for(steps, config.warmup_ratio, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, config.lr_scheduler)
    )
    scaler = grad_scaler(device, precision)

    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "loss_tokens": 0,
        "train_seconds": 0.0,
        "best_eval_loss": None,
        "evals_without_improvement": 0,
        "skipped_steps": 0,
    }
    if checkpoint is not None:
        state.update(
            load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, weights=not sharded)
        )
        say(world, f"Resuming from {checkpoint} (step {state['step']} of {steps})")
    state["processes"] = world.size  # what a step was: checked when resuming (api)
    say(world, f"Optimizer: {optimizer_note}; {steps} steps, {warmup} of warm-up.")
    main = world.is_main
    log, reporters = None, None
    if main:  # only the main process writes files
        resume_step = state["step"] if checkpoint else None
        log = MetricsLog(metrics_path(run_dir), resume_step=resume_step)
        reporters = Reporters(config, run_dir, state["step"])

    def record(values: dict[str, Any]) -> None:
        if log is not None and reporters is not None:
            log.write(values)
            reporters.write(values)

    progress = Progress(steps, state["step"]) if main else None
    # batch_size is per process: a step takes gradient_accumulation_steps micro-batches on each
    accumulate = config.gradient_accumulation_steps * world.size
    plan_cache: dict[int, list[list[int]]] = {}
    eval_result = None
    last_loss = float("nan")
    stopped_early = False
    # divergence (loss above the uniform guess or far above its start, an exploded gradient)
    # is said once, as soon as it shows, and again in the results' warnings
    logged_losses: list[tuple[int, float]] = []
    logged_norms: list[tuple[int, float]] = []
    divergence = None
    vocab_size = _vocab_size(model)

    if preference.needs_reference(config):  # once, before any step changes the model
        reference_started = time.perf_counter()
        frozen = preference.frozen_reference(model) if state["step"] == 0 else None
        forwards = preference.attach_reference_logps(
            model, [train_rows, eval_rows or []], run_dir / preference.REFERENCE_CACHE,
            pad_token_id, config.batch_size, device, precision, frozen,
        )  # fmt: skip
        del frozen
        state["reference_seconds"] = time.perf_counter() - reference_started
        say(world, f"Reference log-probabilities: {forwards} forwards run, the rest cached in "
            f"{run_dir / preference.REFERENCE_CACHE}.")  # fmt: skip
    initial = None
    if eval_rows and state["step"] == 0:  # the untrained adapter is the identity: base model
        initial = _evaluate(model, eval_rows, config, pad_token_id, device, precision, world)
        record(_eval_record(0, initial))
        say(world, f"step 0: eval loss {initial.loss:.4f}, perplexity {initial.perplexity:.2f} "
            "(base model)", progress)  # fmt: skip
    model.train()
    while state["step"] < steps:
        step = state["step"]
        epoch, index = divmod(step, per_epoch)
        if epoch not in plan_cache:
            plan_cache = {epoch: plan_epoch(train_rows, config.batch_size, config.seed, epoch,
                                            group_by_length=not config.packing)}  # fmt: skip
        micro_batches = [
            [train_rows[i] for i in indices]
            for indices in plan_cache[epoch][index * accumulate : (index + 1) * accumulate]
        ]
        started = time.perf_counter()

        # --- the step: forward/backward, all-reduce, clip, update ---
        step_metrics: dict[str, float] = {}
        mine = shard(micro_batches, world)
        if config.objective == "sft":
            # sharded layers gather their weights in every forward and backward, collectives:
            # at an epoch's short last step every process runs as many, the idle ones on a
            # batch whose loss counts zero
            idle = -(-len(micro_batches) // world.size) - len(mine) if sharded else 0
            step_loss, step_loss_tokens = accumulate_gradients(
                model, mine, pad_token_id, device, precision,
                step_loss_tokens=sum(loss_tokens(rows) for rows in micro_batches), scaler=scaler,
                idle_batches=[micro_batches[0]] * idle,
            )  # fmt: skip
        else:  # preference objectives: the loss is a mean over the step's pairs / answers
            step_loss, stats = preference.accumulate_preference_gradients(
                model, mine, config, pad_token_id, device, precision,
                step_units=sum(preference.count_units(rows) for rows in micro_batches),
                step_chosen_tokens=sum(preference.chosen_tokens(rows) for rows in micro_batches),
                scaler=scaler,
            )  # fmt: skip
            step_loss_tokens = sum(loss_tokens(rows) for rows in micro_batches)
            step_metrics = stats.metrics()
        step_loss = all_reduce_sum(step_loss, world)
        all_reduce_gradients(params, world)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = (
            clip_gradients(params, config.max_grad_norm)
            if sharded
            else _clip(params, config.max_grad_norm)
        )
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        lr = scheduler.get_last_lr()[0]
        if finite:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        else:
            diagnosis = nan_diagnosis(
                step + 1, lr, step_loss, grad_norm,
                [o for rows in micro_batches for row in rows for o in row.origins],
                precision, config.learning_rate,
            )  # fmt: skip
            if config.on_nan == "stop":
                optimizer.zero_grad(set_to_none=True)
                last = latest_checkpoint(run_dir)
                kept = f" Last good checkpoint: {last}." if last else ""
                raise TunelabError(f"training stopped: {diagnosis}{kept}")
            say(world, f"Skipping the step: {diagnosis}", progress)
            state["skipped_steps"] += 1
            if scaler is not None:
                scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # --- bookkeeping ---

        seconds = time.perf_counter() - started
        step_tokens = sum(len(row) for rows in micro_batches for row in rows)
        state["step"] += 1
        state["tokens"] += step_tokens
        state["loss_tokens"] += step_loss_tokens
        state["train_seconds"] += seconds
        last_loss = step_loss if finite else last_loss
        if finite:
            logged_losses.append((state["step"], step_loss))
            logged_norms.append((state["step"], grad_norm))
        if finite and divergence is None:
            divergence = diverging(logged_losses, logged_norms, vocab_size, config)
            if divergence is not None:
                say(world, f"Warning: {divergence}", progress)
        log_now = state["step"] % config.logging_steps == 0 or state["step"] == steps
        if log_now:
            record(
                {
                    "step": state["step"],
                    "epoch": round(state["step"] / per_epoch, 4),
                    "loss": round(step_loss, 6) if finite else None,
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else None,
                    "tokens": state["tokens"],
                    "tokens_per_second": round(step_tokens / seconds, 2),
                    **{k: round(v, 6) for k, v in step_metrics.items()},
                }
            )
        if progress is not None:
            progress.update(state["step"], last_loss, step_tokens / seconds, lr, log_now)

        end_of_epoch = state["step"] % per_epoch == 0
        state["eval_loss_at_step"] = None
        if eval_rows and (
            state["step"] == steps
            or (end_of_epoch and config.eval_each_epoch)
            or (config.eval_steps and state["step"] % config.eval_steps == 0)
        ):
            eval_result = _evaluate(
                model, eval_rows, config, pad_token_id, device, precision, world
            )
            stopped_early = _track_best(state, eval_result.loss, config)
            record(_eval_record(state["step"], eval_result))
            say(world, f"step {state['step']}: eval loss {eval_result.loss:.4f}, perplexity "
                f"{eval_result.perplexity:.2f}", progress)  # fmt: skip
            if on_eval is not None:
                on_eval(state["step"], eval_result.loss)
        save_now = (end_of_epoch and config.save_each_epoch) or (
            config.save_steps and state["step"] % config.save_steps == 0
        )
        if state["step"] < steps and (save_now or interrupt.requested or stopped_early):
            whole = None  # sharded: every process helps gather the whole adapter and moments
            if sharded:
                whole = (full_state_for_saving(model), full_optimizer_state(model, optimizer))
            if main:
                saved = save_checkpoint(
                    run_dir, model, optimizer, scheduler, state, config.save_total_limit, scaler,
                    whole=whole,
                )  # fmt: skip
            barrier(world)
        if interrupt.requested and state["step"] < steps:
            if progress is not None:
                progress.close()
            raise TunelabError(
                f"training interrupted at step {state['step']} of {steps}; checkpoint saved in "
                f"{saved if main else run_dir}. Run the same command with --resume to continue "
                "(Python: FineTuner(config).train(resume=True))."
            )
        if stopped_early:
            say(world, f"Early stopping at step {state['step']}: no eval-loss improvement in "
                f"{config.early_stopping_patience} evaluations.", progress)  # fmt: skip
            break
    if progress is not None:
        progress.close()
    if reporters is not None:
        reporters.close()
    if main and config.plot:
        plot_curves(read_metrics(run_dir), run_dir / CURVES)
    model.eval()
    results = _results(state, per_epoch, last_loss, initial, eval_result, stopped_early)
    if divergence is not None:  # the summary says where the run ended up
        final = diverging(logged_losses, logged_norms, vocab_size, config)
        results["warnings"] = [final or divergence]
    results["vocab_size"] = vocab_size
    return results


def diverging(
    losses: list[tuple[int, float]],
    grad_norms: list[tuple[int, float]],
    vocab_size: int | None,
    config: FineTuningConfig,
) -> str | None:
    """A warning naming the learning rate when the run diverges (diagnostics.divergence)."""
    from tunelab.diagnostics.divergence import divergence_advice, divergence_evidence

    evidence = divergence_evidence(losses, grad_norms, vocab_size)
    if evidence is None:
        return None
    advice = divergence_advice(config.learning_rate, config.method)
    return f"training is diverging: {evidence}. {advice}"


def _vocab_size(model: Any) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _evaluate(
    model: Any,
    rows: list[Row],
    config: FineTuningConfig,
    pad_token_id: int,
    device: str,
    precision: str,
    world: World,
) -> EvalResult:
    if config.objective != "sft":
        loss, metrics = preference.evaluate_preference(
            model,
            rows,
            config,
            pad_token_id,
            device,
            precision,  # type: ignore[arg-type]
        )
        return EvalResult(loss, math.exp(min(loss, 50.0)), sum(len(r) for r in rows), metrics)
    return evaluate(model, rows, config.batch_size, pad_token_id, device, precision, world)


def _eval_record(step: int, result: EvalResult) -> dict[str, Any]:
    if result.metrics:  # preference: a perplexity of the objective would mean nothing
        metrics = {f"eval_{k}": round(v, 6) for k, v in result.metrics.items()}
        return {"step": step, "eval_loss": round(result.loss, 6), **metrics}
    return {
        "step": step,
        "eval_loss": round(result.loss, 6),
        "eval_perplexity": round(result.perplexity, 4),
    }


def _track_best(state: dict[str, Any], loss: float, config: FineTuningConfig) -> bool:
    """Record an evaluation; returns whether early stopping's patience has run out."""
    best = state["best_eval_loss"]
    state["eval_loss_at_step"] = loss
    if best is None or loss < best - config.early_stopping_threshold:
        state["evals_without_improvement"] = 0
    else:
        state["evals_without_improvement"] += 1
    state["best_eval_loss"] = loss if best is None else min(best, loss)
    patience = config.early_stopping_patience
    return patience is not None and state["evals_without_improvement"] >= patience


def _results(
    state: dict[str, Any],
    per_epoch: int,
    last_loss: float,
    initial: EvalResult | None,
    eval_result: EvalResult | None,
    stopped_early: bool,
) -> dict[str, Any]:
    seconds = state["train_seconds"]
    results: dict[str, Any] = {
        "steps": state["step"],
        "epochs": round(state["step"] / per_epoch, 4),
        "train_tokens": state["tokens"],
        "train_loss_tokens": state["loss_tokens"],
        "train_runtime_seconds": round(seconds, 3),
        "tokens_per_second": round(state["tokens"] / seconds, 2) if seconds else None,
        "final_train_loss": round(last_loss, 6),
    }
    if state["skipped_steps"]:
        results["skipped_steps"] = state["skipped_steps"]
    if "reference_seconds" in state:  # the reference model's one pass, outside the steps
        results["reference_seconds"] = round(state["reference_seconds"], 3)
    if stopped_early:
        results["stopped_early_at_step"] = state["step"]
    if initial is not None:
        results["initial_eval_loss"] = round(initial.loss, 6)
    if eval_result is not None:
        results.update(
            eval_loss=round(eval_result.loss, 6),
            eval_perplexity=round(eval_result.perplexity, 4),
            best_eval_loss=round(state["best_eval_loss"], 6),
        )
        results.update({f"eval_{k}": round(v, 6) for k, v in eval_result.metrics.items()})
    if initial is not None and initial.metrics:
        results.update({f"initial_eval_{k}": round(v, 6) for k, v in initial.metrics.items()})
    return results


def say(world: World, text: str, progress: Progress | None = None) -> None:
    """Print once (from the main process), through the progress bar when there is one."""
    if not world.is_main:
        return
    if progress is not None:
        progress.write(text)
    else:
        print(text, flush=True)


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
