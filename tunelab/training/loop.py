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
from typing import Any, cast

import torch

from tunelab.config import FineTuningConfig, groups_by_length
from tunelab.errors import TunelabError
from tunelab.methods import after_optimizer_step, method_loss_term, method_state
from tunelab.run_folder import read_metrics
from tunelab.training import preference
from tunelab.training.attention import use_packed_attention
from tunelab.training.batching import Row, collate, loss_tokens, plan_epoch
from tunelab.training.checkpoint import (
    check_resume_point,
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
from tunelab.training.guards import (
    catch_interrupt,
    clear_stop_request,
    nan_diagnosis,
    stop_requested,
)
from tunelab.training.logging import RunLog, say
from tunelab.training.lora_forward import lean_lora_forward
from tunelab.training.loss import causal_lm_loss_sum, release_scratch, stock_loss
from tunelab.training.neftune import neftune
from tunelab.training.norm import fast_rms_norm
from tunelab.training.optim import build_optimizer
from tunelab.training.precision import backward_precision, grad_scaler, mixed_precision
from tunelab.training.preference import PreferenceRow
from tunelab.training.rotary import fast_rotary
from tunelab.training.schedule import lr_factor, warmup_steps_for
from tunelab.training.sharding import (
    clip_gradients,
    forwards_to_add,
    full_optimizer_state,
    full_state_for_saving,
    is_sharded,
    shard_model,
)
from tunelab.training.state import TrainState, track_best


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
    # under FSDP the shorter shares repeat a batch whose loss is not counted
    rounds = len(mine) + forwards_to_add(len(batches), len(mine), model, world)
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
    stop_requests_since: float | None = None,
) -> dict[str, Any]:
    """Train ``model`` (its trainable parameters) on ``train_rows``; returns the run's results.

    ``on_eval(step, eval_loss)`` is called after each evaluation during training; an exception
    it raises (a sweep pruning a trial) stops the run and propagates. ``precision`` is the
    compute precision (bf16/fp16 autocast over fp32 trainable weights, or fp32). ``sharded``:
    split the decoder layers over the processes with FSDP (training.sharding).
    Ctrl-C, or a stop request in ``run_dir`` written at or after ``stop_requests_since``
    (seconds since the epoch; default: now), saves a checkpoint and raises TunelabError.
    """
    since = time.time() if stop_requests_since is None else stop_requests_since
    world = init_world(device)
    reference = None
    if sharded and preference.needs_reference(config) and not is_sharded(model):
        # full fine-tuning's frozen reference, copied before FSDP splits the model (it cannot
        # copy a sharded one) and before the fast path patches its modules' forwards (a copy
        # of a patched forward would run on the original's, sharded, weights)
        reference = preference.frozen_reference(model)  # None with an adapter
    with (
        training_mode(model, config) as plan,
        catch_interrupt() as interrupt,
        stop_requests_cleared(run_dir, world),
    ):
        say(world.is_main, plan.summary())
        run, state = set_up(model, config, Path(run_dir), len(train_rows), pad_token_id,
                            device, precision, resume, sharded, reference)  # fmt: skip
        del reference  # the run holds it until the reference pass
        log = RunLog(run.run_dir, config, run.world.is_main, run.steps, state.step,
                     run.resumed, _vocab_size(model))  # fmt: skip
        if preference.needs_reference(config):  # once, before any step changes the model
            state.reference_seconds = attach_reference(run, state, train_rows, eval_rows, log)
        initial = last_eval = None
        if eval_rows and state.step == 0:  # the untrained adapter is the identity: base model
            initial = evaluate_and_log(run, eval_rows, 0, log, " (base model)")
        stopped_early = False
        model.train()
        while state.step < run.steps and not stopped_early:
            train_step(run, state, step_batches(run, train_rows, state.step), log)
            if eval_rows and eval_due(config, state.step, run):
                last_eval = evaluate_and_log(run, eval_rows, state.step, log)
                stopped_early = track_best(state, last_eval.loss, config)
                if on_eval is not None:
                    on_eval(state.step, last_eval.loss)
            asked = stop_asked(run, interrupt.requested, since, log)
            stopping = asked or stopped_early
            if state.step < run.steps and (save_due(config, state.step, run) or stopping):
                saved = save(run, state)
                if asked:  # Ctrl-C or a stop request: stop here, resumable
                    log.close_progress()
                    raise interrupted(state, run, saved)
        if stopped_early:
            log.say(f"Early stopping at step {state.step}: the last "
                    f"{state.evals_without_improvement} evaluations did not improve on the best "
                    f"eval loss {state.best_eval_loss:.4f}, counted across resumes.")  # fmt: skip
        log.close()
        model.eval()
        return results_of(state, run, log, initial, last_eval, stopped_early)


@dataclass
class Run:
    """What every step of one run uses and no step changes."""

    model: Any
    config: FineTuningConfig
    run_dir: Path
    pad_token_id: int
    device: str
    precision: str  # the compute precision: bf16/fp16 autocast, or fp32
    world: World
    sharded: bool  # decoder layers split over the processes (FSDP)
    params: list[torch.Tensor]  # the trainable ones
    optimizer: Any
    scheduler: Any
    scaler: Any  # fp16's gradient scaler, else None
    steps: int  # optimizer steps in the whole run
    per_epoch: int
    resumed: bool  # from a checkpoint
    # an epoch's batch order is a function of (seed, epoch): planned once, when it starts
    epoch_plan: dict[int, list[list[int]]] = field(default_factory=dict)
    # full fine-tuning under FSDP: the frozen reference, copied before sharding (FSDP cannot
    # copy a sharded model) and sharded like it; dropped after the reference pass
    sharded_reference: Any = None


def set_up(
    model: Any,
    config: FineTuningConfig,
    run_dir: Path,
    num_rows: int,
    pad_token_id: int,
    device: str,
    precision: str,
    resume: bool,
    sharded: bool,
    reference: Any = None,
) -> tuple[Run, TrainState]:
    """The optimizer, schedule and processes of a run, and its state: fresh, or the latest
    checkpoint's (weights, optimizer, schedule, RNG and the method's own state too).
    ``reference``: full fine-tuning's frozen reference, sharded with the model."""
    world = init_world(device)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    steps = total_steps(num_rows, config, world.size)
    if resume:  # a finished run, or a checkpoint past the end, has nothing to resume
        check_resume_point(run_dir, steps, config.early_stopping_patience)
    if sharded:
        if checkpoint is not None:  # whole weights into the whole model, before it is split
            load_weights(checkpoint, model)
            reference = None
        layers = shard_model(model, device)
        if reference is not None:
            shard_model(reference, device)
        say(world.is_main, f"FSDP: {layers} decoder layers sharded over {world.size} processes.")
    torch.manual_seed(config.seed)
    optimizer, optimizer_note = build_optimizer(model, config)
    per_epoch = steps_per_epoch(num_rows, config, world.size)
    warmup = warmup_steps_for(steps, config.warmup_ratio, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, config.lr_scheduler)
    )
    scaler = grad_scaler(device, precision)
    state = TrainState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, not sharded)
        say(world.is_main, f"Resuming from {checkpoint} (step {state.step} of {steps})")
    state.processes = world.size
    say(world.is_main, f"Optimizer: {optimizer_note}; {steps} steps, {warmup} of warm-up.")
    params = [p for p in model.parameters() if p.requires_grad]
    run = Run(model, config, run_dir, pad_token_id, device, precision, world, sharded, params,
              optimizer, scheduler, scaler, steps, per_epoch, checkpoint is not None,
              sharded_reference=reference)  # fmt: skip
    return run, state


def step_batches(run: Run, rows: list[Row], step: int) -> list[list[Row]]:
    """The micro-batches of optimizer step ``step`` (from 0), of every process: batch_size is
    per process, so a step takes gradient_accumulation_steps micro-batches on each."""
    config, (epoch, index) = run.config, divmod(step, run.per_epoch)
    if epoch not in run.epoch_plan:
        run.epoch_plan = {epoch: plan_epoch(rows, config.batch_size, config.seed, epoch,
                                            group_by_length=groups_by_length(config))}  # fmt: skip
    accumulate = config.gradient_accumulation_steps * run.world.size
    planned = run.epoch_plan[epoch][index * accumulate : (index + 1) * accumulate]
    return [[rows[i] for i in indices] for indices in planned]


def train_step(run: Run, state: TrainState, micro_batches: list[list[Row]], log: RunLog) -> None:
    """One optimizer step: forward and backward over this process's micro-batches plus the
    method's own loss term, the gradients summed over the processes, clipped, the update;
    then ``state`` counts it and ``log`` reports it."""
    started = time.perf_counter()
    config, world, model = run.config, run.world, run.model
    mine = shard(micro_batches, world)
    # under FSDP, at an epoch's short last step, the processes with fewer micro-batches run as
    # many forwards and backwards as the others, on a batch whose loss counts zero
    idle = [micro_batches[0]] * forwards_to_add(len(micro_batches), len(mine), model, world)
    if config.objective == "sft":
        loss, _ = accumulate_gradients(
            model, mine, run.pad_token_id, run.device, run.precision,
            step_loss_tokens=sum(loss_tokens(rows) for rows in micro_batches),
            scaler=run.scaler, idle_batches=idle,
        )  # fmt: skip
        metrics: dict[str, float] = {}
    else:  # preference objectives: the loss is a mean over the step's pairs / answers
        loss, stats = preference.accumulate_preference_gradients(
            model, mine, config, run.pad_token_id, run.device, run.precision,
            step_units=sum(preference.count_units(cast(list[PreferenceRow], rows))
                           for rows in micro_batches),
            step_chosen_tokens=sum(preference.chosen_tokens(cast(list[PreferenceRow], rows))
                                   for rows in micro_batches),
            scaler=run.scaler, idle_batches=cast(list[list[PreferenceRow]], idle),
        )  # fmt: skip
        metrics = stats.gathered(world).metrics()
    term = method_loss_term(model)  # AdaLoRA's orthogonality regularisation, once a step
    if term is not None:
        with backward_precision(model, run.precision):  # summed over the processes below
            (run.scaler.scale(term) if run.scaler else term).div(world.size).backward()
        metrics["orth_reg"] = float(term.detach())  # outside the logged loss, as in eval
    loss = all_reduce_sum(loss, world)
    all_reduce_gradients(run.params, world)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = (clip_gradients if run.sharded else _clip)(run.params, config.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        after_optimizer_step(model, state.step + 1)  # AdaLoRA: rank allocation by the step
    else:
        skip_step(run, state, micro_batches, loss, grad_norm, lr, log)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    seconds = time.perf_counter() - started
    tokens = sum(len(row) for rows in micro_batches for row in rows)
    state.step += 1
    state.tokens += tokens
    state.loss_tokens += sum(loss_tokens(rows) for rows in micro_batches)
    state.train_seconds += seconds
    state.eval_loss_at_step = None  # until this step is evaluated
    epoch = round(state.step / run.per_epoch, 4)
    log.step(state.step, epoch, loss, grad_norm, lr, state.tokens, tokens / seconds, metrics)


def skip_step(
    run: Run,
    state: TrainState,
    micro_batches: list[list[Row]],
    loss: float,
    grad_norm: float,
    lr: float,
    log: RunLog,
) -> None:
    """A non-finite loss or gradient norm: stop naming the batch's examples (``on_nan:
    stop``), or skip the update and count it (``on_nan: skip``)."""
    diagnosis = nan_diagnosis(
        state.step + 1, lr, loss, grad_norm,
        [o for rows in micro_batches for row in rows for o in row.origins],
        run.precision, run.config.learning_rate,
    )  # fmt: skip
    if run.config.on_nan == "stop":
        run.optimizer.zero_grad(set_to_none=True)
        last = latest_checkpoint(run.run_dir)
        kept = f" Last good checkpoint: {last}." if last else ""
        raise TunelabError(f"training stopped: {diagnosis}{kept}")
    log.say(f"Skipping the step: {diagnosis}")
    state.skipped_steps += 1
    if run.scaler is not None:
        run.scaler.update()


def stop_asked(run: Run, interrupted: bool, since: float, log: RunLog) -> bool:
    """Whether Ctrl-C or a stop request (read by the main process) asks the run to stop after
    this step; under torchrun every process gets the same answer, so all stop at one step."""
    asked = interrupted
    if not asked and run.world.is_main:
        by = stop_requested(run.run_dir, since)
        if by is not None:
            log.say(f"Stop requested by {by}: saving a checkpoint after this step.")
            asked = True
    if run.world.active:
        asked = all_reduce_sum(int(asked), run.world) > 0
    return asked


@contextmanager
def stop_requests_cleared(run_dir: Path, world: World) -> Iterator[None]:
    """A stop request is removed once the run ends (stopped, finished or failed), so none is
    left in the folder; one from before this run began is ignored by ``stop_requested``."""
    try:
        yield
    finally:
        if world.is_main:
            clear_stop_request(run_dir)


def interrupted(state: TrainState, run: Run, saved: Path | None) -> TunelabError:
    return TunelabError(
        f"training interrupted at step {state.step} of {run.steps}; checkpoint saved in "
        f"{saved or run.run_dir}. Run the same command with --resume to continue (Python: "
        "FineTuner(config).train(resume=True))."
    )


def eval_due(config: FineTuningConfig, step: int, run: Run) -> bool:
    """Evaluate after the last step, each epoch (``eval_each_epoch``), every ``eval_steps``."""
    return (
        step == run.steps
        or (step % run.per_epoch == 0 and config.eval_each_epoch)
        or bool(config.eval_steps and step % config.eval_steps == 0)
    )


def save_due(config: FineTuningConfig, step: int, run: Run) -> bool:
    """Save each epoch (``save_each_epoch``) and every ``save_steps``."""
    return (step % run.per_epoch == 0 and config.save_each_epoch) or bool(
        config.save_steps and step % config.save_steps == 0
    )


def save(run: Run, state: TrainState) -> Path | None:
    """A checkpoint of the step ``state`` is at (written by the main process; returns its
    folder there, None elsewhere)."""
    model = run.model
    whole = None  # sharded: every process helps gather the whole adapter and moments
    if run.sharded:
        whole = (full_state_for_saving(model), full_optimizer_state(model, run.optimizer))
    extra = method_state(model)  # gathered on every process too
    saved = None
    if run.world.is_main:
        saved = save_checkpoint(
            run.run_dir, model, run.optimizer, run.scheduler, state,
            run.config.save_total_limit, run.scaler, whole=whole, method_state=extra,
        )  # fmt: skip
    barrier(run.world)
    return saved


def attach_reference(
    run: Run,
    state: TrainState,
    train_rows: list[Row],
    eval_rows: list[Row] | None,
    log: RunLog,
) -> float:
    """Preference objectives with a reference model: its log-probabilities of every row,
    computed (or read from the run's cache) before any step changes the model; returns the
    seconds it took."""
    started = time.perf_counter()
    cache = run.run_dir / preference.REFERENCE_CACHE
    frozen = run.sharded_reference
    if frozen is None and not run.sharded and state.step == 0:
        frozen = preference.frozen_reference(run.model)
    run.sharded_reference = None
    forwards = preference.attach_reference_logps(
        run.model, cast(list[list[PreferenceRow]], [train_rows, eval_rows or []]), cache,
        run.pad_token_id,
        run.config.batch_size, run.device, run.precision, frozen,
    )  # fmt: skip
    del frozen
    seconds = time.perf_counter() - started
    log.say(f"Reference log-probabilities: {forwards} forwards run, the rest cached in {cache}.")
    return seconds


def evaluate_and_log(
    run: Run, rows: list[Row], step: int, log: RunLog, note: str = ""
) -> EvalResult:
    """Evaluate on ``rows``, write the metrics line and say the loss."""
    if run.config.objective != "sft":
        loss, metrics = preference.evaluate_preference(
            run.model, cast(list[PreferenceRow], rows), run.config, run.pad_token_id, run.device,
            run.precision,
        )  # fmt: skip
        result = EvalResult(loss, math.exp(min(loss, 50.0)), sum(len(r) for r in rows), metrics)
    else:
        result = evaluate(run.model, rows, run.config.batch_size, run.pad_token_id, run.device,
                          run.precision, run.world)  # fmt: skip
    log.record(_eval_record(step, result))
    log.say(f"step {step}: {_eval_line(result)}{note}")
    return result


def _vocab_size(model: Any) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _eval_line(result: EvalResult) -> str:
    if result.metrics:  # preference: TRL's reward metrics, not a perplexity of the objective
        return preference.format_eval_metrics(result.loss, result.metrics)
    return f"eval loss {result.loss:.4f}, perplexity {result.perplexity:.2f}"


def _eval_record(step: int, result: EvalResult) -> dict[str, Any]:
    if result.metrics:  # preference: a perplexity of the objective would mean nothing
        metrics = {f"eval_{k}": round(v, 6) for k, v in result.metrics.items()}
        return {"step": step, "eval_loss": round(result.loss, 6), **metrics}
    return {
        "step": step,
        "eval_loss": round(result.loss, 6),
        "eval_perplexity": round(result.perplexity, 4),
    }


def results_of(
    state: TrainState,
    run: Run,
    log: RunLog,
    initial: EvalResult | None,
    last_eval: EvalResult | None,
    stopped_early: bool,
) -> dict[str, Any]:
    """The run's results (results.json, less what api adds): steps, tokens, time, losses."""
    seconds = state.train_seconds
    results: dict[str, Any] = {
        "steps": state.step,
        "epochs": round(state.step / run.per_epoch, 4),
        "train_tokens": state.tokens,
        "train_loss_tokens": state.loss_tokens,
        "train_runtime_seconds": round(seconds, 3),
        "tokens_per_second": round(state.tokens / seconds, 2) if seconds else None,
        "final_train_loss": round(log.last_loss, 6),
    }
    if state.skipped_steps:
        results["skipped_steps"] = state.skipped_steps
    if state.reference_seconds is not None:  # the reference model's one pass, outside steps
        results["reference_seconds"] = round(state.reference_seconds, 3)
    if stopped_early:
        results["stopped_early_at_step"] = state.step
    if initial is not None:
        results["initial_eval_loss"] = round(initial.loss, 6)
    if last_eval is not None and state.best_eval_loss is not None:
        results.update(
            eval_loss=round(last_eval.loss, 6),
            best_eval_loss=round(state.best_eval_loss, 6),
        )
        if not last_eval.metrics:  # preference runs report their reward metrics instead
            results["eval_perplexity"] = round(last_eval.perplexity, 4)
        results.update({f"eval_{k}": round(v, 6) for k, v in last_eval.metrics.items()})
    if initial is not None and initial.metrics:
        results.update({f"initial_eval_{k}": round(v, 6) for k, v in initial.metrics.items()})
    if initial is None and run.resumed and run.world.is_main:
        results.update(_initial_eval_logged(run.run_dir))
    warnings = log.warnings()  # the summary says where the run ended up
    if warnings:
        results["warnings"] = warnings
    results["vocab_size"] = log.vocab_size
    return results


def _initial_eval_logged(run_dir: Path) -> dict[str, Any]:
    """A resumed run's step-0 evaluation (the base model), as results reports it, from the
    eval line of step 0 that metrics.jsonl kept: the resumed process did not run it."""
    for record in read_metrics(run_dir):
        if record.get("step") == 0 and "eval_loss" in record:
            numbers = {k: v for k, v in record.items() if k.startswith("eval_")}
            if "eval_perplexity" in numbers:  # a language-model run reports the loss only
                return {"initial_eval_loss": numbers["eval_loss"]}
            return {f"initial_{k}": v for k, v in numbers.items()}
    return {}


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
