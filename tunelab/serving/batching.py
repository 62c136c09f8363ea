"""Generate waiting requests together: a worker thread takes every request queued so far,
groups them by adapter and sampling settings, and runs one left-padded ``generate`` per group.

Tokens reach each request as they are made (for streaming) through a stopping criterion that
``generate`` calls after every step; it also ends each row at its own ``max_tokens`` or stop
string, so one long answer does not hold the short ones back in the reply.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.serving.models import ModelPool, ServedModel


@dataclass
class Job:
    """One request's prompt and settings, and how its text reaches the caller.

    ``on_text(delta)`` gets new answer text as it is made; ``on_done(text, finish_reason,
    completion_tokens)`` once at the end; ``on_error(message)`` instead if generation failed.
    The callbacks run on the worker thread.
    """

    served: ServedModel
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    on_text: Callable[[str], None]
    on_done: Callable[[str, str, int], None]
    on_error: Callable[[str], None]
    # filled in while generating
    text: str = ""
    sent: int = 0
    tokens: int = 0
    finish_reason: str | None = None
    ids: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def group_key(self) -> tuple:
        # Requests share a generate call when they share its settings; a seeded request runs
        # alone so that its seed alone decides its samples.
        sampling = None if self.greedy else (self.temperature, self.top_p, self.seed)
        return (self.served.adapter, id(self.served.tokenizer), sampling, self.seed is not None)


class BatchWorker:
    """The thread that owns the model: requests go in with ``submit``; ``stop`` ends it."""

    def __init__(self, pool: ModelPool, max_batch_size: int = 8) -> None:
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="tunelab-batcher", daemon=True)
        self.batches: list[int] = []  # sizes of the batches run, for tests and the benchmark
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            waiting = [first]
            while True:  # everything queued while the last batch ran
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                waiting.append(job)
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

    def _generate(self, jobs: list[Job]) -> None:
        try:
            self.batches.append(len(jobs))
            run_batch(self.pool, jobs)
        except Exception as exc:  # noqa: BLE001 - a failed batch must not kill the server
            for job in jobs:
                if job.finish_reason is None:
                    job.on_error(f"generation failed: {type(exc).__name__}: {exc}")
            return
        for job in jobs:
            _flush(job, final=True)
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
                if job.finish_reason is not None:
                    done[row] = True
                    continue
                token = int(ids[row, -1])
                if token == eos:
                    job.finish_reason = "stop"
                else:
                    job.ids.append(token)
                    job.tokens += 1
                    job.text = tokenizer.decode(job.ids, skip_special_tokens=True)
                    if _cut_at_stop(job):
                        job.finish_reason = "stop"
                    elif job.tokens >= job.max_tokens:
                        job.finish_reason = "length"
                _flush(job, final=job.finish_reason is not None)
                done[row] = job.finish_reason is not None
            return done

    if served.adapter is None and hasattr(model, "disable_adapter"):
        context: Any = model.disable_adapter()
    else:
        if served.adapter is not None:
            model.set_adapter(served.adapter)
        context = torch.no_grad()
    with context, torch.no_grad():
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            stopping_criteria=StoppingCriteriaList([Progress()]),
            **options,
        )


def _cut_at_stop(job: Job) -> bool:
    """Cut ``job.text`` before the first stop string in it; True when one was found."""
    positions = [job.text.find(s) for s in job.stop if s and s in job.text]
    if not positions:
        return False
    job.text = job.text[: min(positions)]
    return True


def _flush(job: Job, final: bool) -> None:
    """Send the text not sent yet, holding back what could still grow into a stop string or is
    half a character (the tokenizer's U+FFFD for an incomplete UTF-8 sequence)."""
    end = len(job.text)
    if not final:
        hold = max((len(s) - 1 for s in job.stop), default=0)
        end = max(job.sent, end - hold)
        while end > job.sent and job.text[end - 1] == "\ufffd":
            end -= 1
    if end > job.sent:
        job.on_text(job.text[job.sent : end])
        job.sent = end
