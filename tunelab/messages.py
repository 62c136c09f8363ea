"""tunelab's notes and warnings to the person running it go through :mod:`logging`, on the
``tunelab`` logger and its children (``tunelab.ownership``, ``tunelab.run_folder``...), so a
program or notebook that embeds tunelab can silence, redirect or record them::

    logging.getLogger("tunelab").setLevel(logging.ERROR)       # quiet
    logging.getLogger("tunelab").handlers.clear()               # route through your own set-up

By default one console handler shows them as the command line always has: notes (INFO) on
stdout, warnings on stderr prefixed ``warning:``. The handler looks up ``sys.stdout`` and
``sys.stderr`` when it writes, so redirections made later (a notebook cell, a test) are seen.
"""

from __future__ import annotations

import logging
import sys

ROOT = "tunelab"


class ConsoleHandler(logging.Handler):
    """INFO and below to stdout as written; WARNING and above to stderr as 'warning: ...'."""

    def emit(self, record: logging.LogRecord) -> None:
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
