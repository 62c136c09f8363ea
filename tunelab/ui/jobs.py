"""Long work the app starts (training, merge, export, eval, serve) as CLI commands in their own
processes, so the app stays responsive, a run outlives the browser tab, and every action is the
one the CLI runs.

A run's state is read from its folder (metrics.jsonl, checkpoints, results.json), so a run
started from a shell shows up and is watched the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_FOLDER = ".tunelab-ui"


@dataclass
class Job:
    kind: str  # train, merge, export, eval, serve
    target: str  # the run folder (or model) it works on
    command: list[str]
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    address: str | None = None  # a server's (serve): http://127.0.0.1:PORT/v1
    stop_asked: bool = False

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def state(self) -> str:
        """running, done, failed, or stopped (ended after this app asked it to stop)."""
        if self.running:
            return "running"
        if self.stop_asked:
            return "stopped"
        return "done" if self.returncode == 0 else "failed"

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Jobs:
    """The processes this app started, keyed by (kind, target)."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.jobs: dict[tuple[str, str], Job] = {}

    def start(
        self, kind: str, target: str, arguments: list[str], address: str | None = None
    ) -> Job:
        """Run ``tunelab ARGUMENTS`` (this interpreter, this tunelab) with its output logged;
        a job of this kind already running on ``target`` is returned instead."""
        current = self.jobs.get((kind, target))
        if current is not None and current.running:
            return current
        logs = self.workspace / LOG_FOLDER
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{kind}-{Path(target).name}-{int(time.time() * 1000)}.log"
        command = [sys.executable, "-m", "tunelab.cli", *arguments]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log.open("w") as out:
            # a session of its own: Ctrl-C on `tunelab ui` does not reach the training run
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workspace,
                env=env,
                start_new_session=True,
            )
        job = Job(kind, target, command, log, process, address=address)
        self.jobs[(kind, target)] = job
        return job

    def get(self, kind: str, target: str) -> Job | None:
        return self.jobs.get((kind, target))

    def stop(self, kind: str, target: str) -> bool:
        """Ask a job to stop as Ctrl-C does (training saves a checkpoint first)."""
        job = self.jobs.get((kind, target))
        if job is None or not job.running:
            return False
        job.stop_asked = True
        job.process.send_signal(signal.SIGINT)
        return True

    def close(self) -> None:
        """Reap finished processes (running ones are left to finish)."""
        for job in self.jobs.values():
            job.process.poll()
