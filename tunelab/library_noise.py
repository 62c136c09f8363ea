"""Keep the libraries' chatter out of tunelab's output (``--debug`` shows it again).

What a user of ``tunelab train`` read as errors, and where each comes from:

- ``Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'``:
  a ``logging`` warning of ``bitsandbytes.backends.cpu.ops``, emitted once when bitsandbytes is
  imported (peft imports it) on a CPU with AVX-512 bf16; bitsandbytes falls back to its own
  kernel, so nothing is lost. No handler is configured, so Python's last-resort handler prints it.
- FutureWarning / DeprecationWarning from transformers, peft, torch, accelerate and datasets
  (``warnings.warn`` in their modules): notes for tunelab's developers about their APIs.
- Progress bars of the libraries (transformers' "Writing model shards", the hub's downloads):
  their tqdm, switched off by ``HF_HUB_DISABLE_PROGRESS_BARS`` read at import.
- transformers' and peft's own ``logging`` notes below error level.

Each is silenced where it starts (that logger, those modules' warnings), never globally, so
tunelab's own warnings and messages are untouched.
"""

from __future__ import annotations

import logging
import os
import warnings

# the packages whose deprecation notes are not the user's business
LIBRARIES = (
    "transformers",
    "peft",
    "torch",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
)
# library loggers kept to errors (their warnings are about their own set-up)
QUIET_LOGGERS = ("transformers", "peft", "accelerate", "datasets", "huggingface_hub")
# (logger, message start) of single known warnings from loggers that also say useful things
KNOWN_NOTES = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def silence_library_noise() -> None:
    """Install the filters above; call before the libraries are imported (the progress-bar and
    verbosity settings are read at import)."""
    modules = r"(" + "|".join(LIBRARIES) + r")(\.|$)"
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=modules)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start in KNOWN_NOTES:
        by_logger[name] = (*by_logger.get(name, ()), start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)  # the same object the library's getLogger returns
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
