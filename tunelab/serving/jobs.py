"""One request of ``tunelab serve`` on its way through the worker: its prompt and settings, the
answer so far, and how each new token reaches the caller (``accept_token``). Shared by the
whole-batch path (``tunelab.serving.batching``) and the step loop (``tunelab.serving.inflight``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.serving.models import ServedModel


@dataclass(eq=False)
class Job:
    """One request's prompt and settings, and how its text reaches the caller.

    ``on_text(delta)`` gets new answer text as it is made; ``on_done(text, finish_reason,
    completion_tokens)`` once at the end; ``on_error(message)`` instead if generation failed.
    The callbacks run on the worker thread. ``cancelled`` (set by ``BatchWorker.cancel``) makes
    the worker drop the request at its next step, without calling back.
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
    cancelled: bool = False
    _generator: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> Any:
        """The request's own random generator when it gave a seed (so that its seed alone
        decides its samples, whatever else is in the batch), else None: the global one."""
        if self.seed is None:
            return None
        if self._generator is None:
            import torch

            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def group_key(self) -> tuple:
        # Requests share a generate call when they share its settings; a seeded request runs
        # alone so that its seed alone decides its samples. The served name is unique in the
        # pool (an id() of an object could be reused by another after it is freed).
        sampling = None if self.greedy else (self.temperature, self.top_p, self.seed)
        return (self.served.adapter, self.served.name, sampling, self.seed is not None)


def accept_token(job: Job, token: int) -> bool:
    """Add ``token`` to ``job``'s answer, send the text that is safe to send, and say whether
    the job is finished (end-of-turn token, stop string or ``max_tokens``)."""
    if job.finish_reason is not None:
        return True
    if token == job.served.tokenizer.eos_token_id:
        job.finish_reason = "stop"
    else:
        job.ids.append(token)
        job.tokens += 1
        job.text = job.served.tokenizer.decode(job.ids, skip_special_tokens=True)
        if _cut_at_stop(job):
            job.finish_reason = "stop"
        elif job.tokens >= job.max_tokens:
            job.finish_reason = "length"
    flush(job, final=job.finish_reason is not None)
    return job.finish_reason is not None


def _cut_at_stop(job: Job) -> bool:
    """Cut ``job.text`` before the first stop string in it; True when one was found."""
    positions = [job.text.find(s) for s in job.stop if s and s in job.text]
    if not positions:
        return False
    job.text = job.text[: min(positions)]
    return True


def flush(job: Job, final: bool) -> None:
    """Send the text not sent yet, holding back what could still grow into a stop string or is
    half a character (the tokenizer's U+FFFD for an incomplete UTF-8 sequence)."""
    end = len(job.text)
    if not final:
        hold = max((len(s) - 1 for s in job.stop if s), default=0)
        end = max(job.sent, end - hold)
        while end > job.sent and job.text[end - 1] == "\ufffd":
            end -= 1
    if end > job.sent:
        job.on_text(job.text[job.sent : end])
        job.sent = end
