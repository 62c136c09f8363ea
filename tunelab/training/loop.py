"""The training loop: read it top to bottom.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Each micro-batch's summed
loss is divided by the loss tokens of the whole step, so k micro-batches give exactly the
gradient of one batch k times larger, however the tokens fall between them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from tunelab.config import FineTuningConfig
from tunelab.training.batching import Row, collate, loss_tokens, plan_epoch
from tunelab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunelab.training.logging import MetricsLog, Progress
from tunelab.training.loss import causal_lm_loss_sum
from tunelab.training.schedule import lr_factor, warmup_steps_for


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


@torch.no_grad()
def evaluate(
    model: Any, rows: list[Row], batch_size: int, pad_token_id: int, device: str = "cpu"
) -> EvalResult:
    """Token-weighted mean loss (and perplexity) over ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = _to(collate(rows[start : start + batch_size], pad_token_id), device)
        loss_sum, n = causal_lm_loss_sum(model, batch)
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return EvalResult(loss, math.exp(min(loss, 50.0)), count)


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accumulate_gradients(
    model: Any, micro_batches: list[list[Row]], pad_token_id: int, device: str = "cpu"
) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches; returns the step's mean
    loss and its number of loss tokens.

    Each micro-batch's summed loss is divided by the loss tokens of the whole step, so the
    accumulated gradient equals that of one batch holding all the micro-batches.
    """
    step_loss_tokens = sum(loss_tokens(rows) for rows in micro_batches)
    step_loss = 0.0
    for rows in micro_batches:
        loss_sum, _ = causal_lm_loss_sum(model, _to(collate(rows, pad_token_id), device))
        (loss_sum / max(step_loss_tokens, 1)).backward()
        step_loss += float(loss_sum.detach())
    return step_loss / max(step_loss_tokens, 1), step_loss_tokens


def steps_per_epoch(num_rows: int, config: FineTuningConfig) -> int:
    micro_batches = math.ceil(num_rows / config.batch_size)
    return math.ceil(micro_batches / config.gradient_accumulation_steps)


def total_steps(num_rows: int, config: FineTuningConfig) -> int:
    return config.max_steps or steps_per_epoch(num_rows, config) * config.num_epochs


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
) -> dict[str, Any]:
    """Train ``model`` (its trainable parameters) on ``train_rows``; returns the run's results.

    ``on_eval(step, eval_loss)`` is called after each evaluation during training; an exception
    it raises (a sweep pruning a trial) stops the run and propagates.
    """
    run_dir = Path(run_dir)
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
    )
    per_epoch = steps_per_epoch(len(train_rows), config)
    steps = total_steps(len(train_rows), config)
    warmup = warmup_steps_for(steps, config.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, config.lr_scheduler)
    )

    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "loss_tokens": 0,
        "train_seconds": 0.0,
        "best_eval_loss": None,
    }
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        print(f"Resuming from {checkpoint} (step {state['step']} of {steps})")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=state["step"] if checkpoint else None)
    progress = Progress(steps, state["step"])
    accumulate = config.gradient_accumulation_steps
    plan_cache: dict[int, list[list[int]]] = {}
    eval_result = None
    last_loss = float("nan")

    initial = None
    if eval_rows and state["step"] == 0:  # the untrained adapter is the identity: base model
        initial = evaluate(model, eval_rows, config.batch_size, pad_token_id, device)
        log.write(
            {
                "step": 0,
                "eval_loss": round(initial.loss, 6),
                "eval_perplexity": round(initial.perplexity, 4),
            }
        )
        progress.write(
            f"step 0: eval loss {initial.loss:.4f}, perplexity "
            f"{initial.perplexity:.2f} (base model)"
        )
    model.train()
    while state["step"] < steps:
        step = state["step"]
        epoch, index = divmod(step, per_epoch)
        if epoch not in plan_cache:
            plan_cache.clear()
            plan_cache[epoch] = plan_epoch(
                train_rows,
                config.batch_size,
                config.seed,
                epoch,
                group_by_length=not config.packing,
            )
        micro_batches = [
            [train_rows[i] for i in indices]
            for indices in plan_cache[epoch][index * accumulate : (index + 1) * accumulate]
        ]
        started = time.perf_counter()

        step_loss, step_loss_tokens = accumulate_gradients(
            model, micro_batches, pad_token_id, device
        )
        grad_norm = _clip(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - started
        step_tokens = sum(len(row) for rows in micro_batches for row in rows)
        state["step"] += 1
        state["tokens"] += step_tokens
        state["loss_tokens"] += step_loss_tokens
        state["train_seconds"] += seconds
        last_loss = step_loss
        lr = scheduler.get_last_lr()[0]
        step_record = {
            "step": state["step"],
            "epoch": round(state["step"] / per_epoch, 4),
            "loss": round(last_loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "tokens": state["tokens"],
            "tokens_per_second": round(step_tokens / seconds, 2),
        }
        log_now = state["step"] % config.logging_steps == 0 or state["step"] == steps
        if log_now:
            log.write(step_record)
        progress.update(state["step"], last_loss, step_tokens / seconds, lr, log_now)

        end_of_epoch = state["step"] % per_epoch == 0
        if eval_rows and (
            state["step"] == steps
            or end_of_epoch
            or (config.eval_steps and state["step"] % config.eval_steps == 0)
        ):
            eval_result = evaluate(model, eval_rows, config.batch_size, pad_token_id, device)
            best = state["best_eval_loss"]
            state["best_eval_loss"] = (
                eval_result.loss if best is None else min(best, eval_result.loss)
            )
            log.write(
                {
                    "step": state["step"],
                    "eval_loss": round(eval_result.loss, 6),
                    "eval_perplexity": round(eval_result.perplexity, 4),
                }
            )
            progress.write(
                f"step {state['step']}: eval loss {eval_result.loss:.4f}, "
                f"perplexity {eval_result.perplexity:.2f}"
            )
            if on_eval is not None:
                on_eval(state["step"], eval_result.loss)
        if state["step"] < steps and (
            end_of_epoch or (config.save_steps and state["step"] % config.save_steps == 0)
        ):
            save_checkpoint(run_dir, model, optimizer, scheduler, state)
    progress.close()
    model.eval()

    seconds = state["train_seconds"]
    results = {
        "steps": state["step"],
        "epochs": round(state["step"] / per_epoch, 4),
        "train_tokens": state["tokens"],
        "train_loss_tokens": state["loss_tokens"],
        "train_runtime_seconds": round(seconds, 3),
        "tokens_per_second": round(state["tokens"] / seconds, 2) if seconds else None,
        "final_train_loss": round(last_loss, 6),
    }
    if initial is not None:
        results["initial_eval_loss"] = round(initial.loss, 6)
    if eval_result is not None:
        results.update(
            eval_loss=round(eval_result.loss, 6),
            eval_perplexity=round(eval_result.perplexity, 4),
            best_eval_loss=round(state["best_eval_loss"], 6),
        )
    return results


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
