"""tunelab's notes and warnings to the person running it go through :mod:`logging`, on the
``tunelab`` logger and its children (``tunelab.ownership``, ``tunelab.run_folder``...), so a
program or notebook that embeds tunelab can silence, redirect or record them::

    logging.getLogger("tunelab").setLevel(logging.ERROR)       # quiet
    logging.getLogger("tunelab").handlers.clear()               # route through your own set-up

By default one console handler shows them as the command line always has: notes (INFO) on
stdout, warnings on stderr prefixed ``warning:``. The handler looks up ``sys.stdout`` and
``sys.stderr`` when it writes, so redirections made later (a notebook cell, a test) are seen.

Under torchrun / accelerate launch every process loads the same config, data and model, so a
note or warning about them would print once per process: the console handler shows notes and
warnings from the main process only (as accelerate's loggers do by default), errors from every
process, and a record logged with ``extra={"all_ranks": True}`` (something only that process
knows) from every process.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "tunelab"


def launched_processes() -> int:
    """How many processes torchrun / accelerate launch started (WORLD_SIZE; 1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process prints a run's notes: rank 0, or the only process. Read from the
    launcher's RANK, so it holds before the process group is joined."""
    return launched_processes() <= 1 or int(os.environ.get("RANK", "0")) == 0


def _shown_here(record: logging.LogRecord) -> bool:
    return (
        record.levelno >= logging.ERROR or getattr(record, "all_ranks", False) or is_main_process()
    )


class ConsoleHandler(logging.Handler):
    """INFO and below to stdout as written; WARNING and above to stderr as 'warning: ...';
    under a launcher, notes and warnings from the main process only."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _shown_here(record):  # the main process shows it (module docstring)
            return
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                stream = sys.stderr
                message = f"warning: {message}"
            else:
                stream = sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own convention: never raise from emit)
            self.handleError(record)


def install_console_handler() -> None:
    """Attach the console handler to the ``tunelab`` logger once (idempotent); its level is
    INFO unless the user set one. The messages do not also propagate to the root logger, so a
    program's own ``basicConfig`` does not print them twice."""
    logger = logging.getLogger(ROOT)
    if any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        return
    logger.addHandler(ConsoleHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False
