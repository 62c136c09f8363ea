"""The worker thread that owns the model and generates every request.

By default it batches continuously (``tunelab.serving.inflight``): the rows of one adapter
decode together a token per step, a request that arrives joins its adapter's batch at the next
step, and a finished or cancelled one leaves at once. Requests for different adapters run as
separate batches, stepped in turn. Models the step loop cannot serve, or ``continuous=False``,
take the whole-batch path: everything queued so far is grouped by adapter and sampling and run
through one left-padded ``generate`` per group.

Tokens reach each request as they are made (for streaming); each row ends at its own
``max_tokens``, stop string or end-of-turn token.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from tunelab.serving import inflight
from tunelab.serving.jobs import Job, accept_token, flush
from tunelab.serving.models import ModelPool

logger = logging.getLogger(__name__)


class BatchWorker:
    """The thread that owns the model: requests go in with ``submit``, leave early with
    ``cancel``; ``stop`` ends it.

    ``batches`` lists how many requests started together (one prefill, or one ``generate`` on
    the whole-batch path); ``step_rows`` how many rows each decode step ran; ``in_flight`` how
    many requests are being generated now. They are for tests and the benchmark.
    """

    def __init__(self, pool: ModelPool, max_batch_size: int = 8, continuous: bool = True) -> None:
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.continuous = continuous
        if continuous:
            why = inflight.continuous_unsupported(pool.model)
            if why is not None:
                logger.warning(
                    "continuous batching is off for this model: %s; requests that arrive "
                    "while a batch runs wait for it to finish.",
                    why,
                )
                self.continuous = False
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches: list[int] = []
        self.step_rows: list[int] = []
        self.in_flight = 0
        self.cancelled = 0  # requests dropped because their client went away
        run = self._run_continuous if self.continuous else self._run_whole
        self.thread = threading.Thread(target=run, name="tunelab-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def cancel(self, job: Job) -> None:
        """Drop ``job`` (its client went away) at the worker's next step; no callback follows."""
        job.cancelled = True

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _take_waiting(self, block: bool) -> tuple[list[Job], bool]:
        """The jobs queued so far (waiting for one if ``block``) and whether ``stop`` was called."""
        waiting: list[Job] = []
        while True:
            try:
                job = self.jobs.get(block=block and not waiting)
            except queue.Empty:
                return waiting, False
            if job is None:
                return waiting, True
            waiting.append(job)

    def _run_continuous(self) -> None:
        running: dict[str | None, inflight.Batch] = {}  # one batch per adapter
        waiting: list[Job] = []
        stopping = False
        while not stopping or running:
            new, stop_now = self._take_waiting(block=not running and not waiting)
            stopping = stopping or stop_now
            waiting = self._live(waiting + new)
            if stopping:
                waiting = []
            # admit waiting requests up to the batch size, grouped by adapter, in arrival order
            joining: dict[str | None, list[Job]] = {}
            still_waiting = []
            for job in waiting:
                adapter = job.served.adapter
                rows = len(running[adapter].jobs) if adapter in running else 0
                if rows + len(joining.get(adapter, [])) < self.max_batch_size:
                    joining.setdefault(adapter, []).append(job)
                else:
                    still_waiting.append(job)
            waiting = still_waiting
            for adapter, jobs in joining.items():
                self.batches.append(len(jobs))
                batch = self._guarded(jobs, inflight.prefill, jobs)
                running_batch = running.pop(adapter, None)
                merged = inflight.merge(running_batch, batch)
                if merged is not None:
                    running[adapter] = merged
            for adapter in list(running):
                batch = running.pop(adapter)
                live = self._live(batch.jobs)
                kept = inflight.select_rows(batch, [batch.jobs.index(job) for job in live])
                if kept is None:
                    continue
                self.step_rows.append(len(kept.jobs))
                stepped = self._guarded(kept.jobs, inflight.step, kept)
                if stepped is not None:
                    running[adapter] = stepped
            self.in_flight = sum(len(b.jobs) for b in running.values())

    def _live(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` without the cancelled ones, which are counted."""
        live = [job for job in jobs if not job.cancelled]
        self.cancelled += len(jobs) - len(live)
        return live

    def _guarded(
        self, jobs: list[Job], work: Callable[[Any, Any], Any], argument: Any
    ) -> inflight.Batch | None:
        """Run ``work(model, argument)`` (a prefill or a step of ``jobs``); finish the jobs it
        finished. On an error every job of it gets the error, and the batch is dropped (the
        server goes on)."""
        try:
            batch, finished = work(self.pool.model, argument)
        except Exception as exc:  # noqa: BLE001 - a failed batch must not kill the server
            logger.exception("generation failed")
            for job in jobs:
                if not job.cancelled:
                    job.on_error(f"generation failed: {type(exc).__name__}: {exc}")
            return None
        for job in finished:
            if not job.cancelled:
                job.on_done(job.text, job.finish_reason or "length", job.tokens)
        return batch

    def _run_whole(self) -> None:
        while True:
            waiting, stopping = self._take_waiting(block=True)
            groups: dict[tuple, list[Job]] = {}
            for job in waiting:
                groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                if group[0].seed is not None:
                    chunks = [[job] for job in group]
                else:
                    size = self.max_batch_size
                    chunks = [group[i : i + size] for i in range(0, len(group), size)]
                for chunk in chunks:
                    self._generate(chunk)
            if stopping:
                return

    def _generate(self, jobs: list[Job]) -> None:
        jobs = self._live(jobs)
        if not jobs:
            return
        try:
            self.batches.append(len(jobs))
            self.in_flight = len(jobs)
            run_batch(self.pool, jobs)
        except Exception as exc:  # noqa: BLE001 - a failed batch must not kill the server
            for job in jobs:
                if job.finish_reason is None and not job.cancelled:
                    job.on_error(f"generation failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self.in_flight = 0
        for job in jobs:
            if job.cancelled:  # left during generate: its rows were ended early
                self.cancelled += 1
                continue
            flush(job, final=True)
            job.on_done(job.text, job.finish_reason or "length", job.tokens)


def run_batch(pool: ModelPool, jobs: list[Job]) -> None:
    """One left-padded ``generate`` for ``jobs`` (same adapter, tokenizer and sampling), with the
    options ``tunelab.generation.generate_from_text`` uses, so greedy answers match it."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    served = jobs[0].served
    tokenizer, model = served.tokenizer, pool.model
    pad = tokenizer.pad_token_id
    longest = max(len(job.prompt_ids) for job in jobs)
    input_ids = torch.tensor([[pad] * (longest - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
    attention_mask = torch.tensor(
        [[0] * (longest - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs]
    )
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    options: dict[str, Any] = {
        "max_new_tokens": max(job.max_tokens for job in jobs),
        "pad_token_id": pad,
        "eos_token_id": eos,
        "repetition_penalty": 1.0,
    }
    if jobs[0].greedy:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        options.update(do_sample=True, temperature=jobs[0].temperature, top_p=jobs[0].top_p)
        options["top_k"] = None  # OpenAI has no top_k; the model's default must not apply
        if jobs[0].seed is not None:
            torch.manual_seed(jobs[0].seed)

    class Progress(StoppingCriteria):
        """Hands each row's new tokens to its job and ends rows that are finished."""

        def __call__(self, ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = torch.zeros(len(jobs), dtype=torch.bool, device=ids.device)
            for row, job in enumerate(jobs):
                if job.cancelled:
                    job.finish_reason = job.finish_reason or "cancelled"
                done[row] = accept_token(job, int(ids[row, -1]))
            return done

    with inflight.adapter_context(model, served.adapter), torch.no_grad():
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            stopping_criteria=StoppingCriteriaList([Progress()]),
            **options,
        )
