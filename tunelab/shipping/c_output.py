"""Quiet C libraries: what llama.cpp's quantizer prints per tensor (from C, to the process's own
stdout and stderr, past Python's ``sys.stdout``) is caught in a file and summed up in one line."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator

# llama.cpp (llama-quant.cpp): "warning: blk.0.attn_q.weight - ncols 64 not divisible by 256
# (required for type q4_K) -> falling back to q5_0"
_FALLBACK = re.compile(
    r"(\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\S+)\)"
    r"\s*-> falling back to\s+(\S+)"
)


def _flush_c_streams() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # C's stdio buffers, before the descriptors move
    except (OSError, AttributeError, TypeError):  # no C library reachable this way (Windows)
        pass


@contextlib.contextmanager
def captured_c_output() -> Iterator[list[str]]:
    """Point file descriptors 1 and 2 at a temporary file for the block, so text that C code
    writes there does not reach the terminal, and ``sys.stdout``/``sys.stderr`` too (llama-cpp-
    python hands llama.cpp's log to Python's ``sys.stderr``); the yielded list gets the lines
    after the block (also when it raised)."""
    lines: list[str] = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_streams()
    python_text = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(python_text), contextlib.redirect_stderr(python_text):
                yield lines
        finally:
            _flush_c_streams()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", errors="replace").splitlines())
            lines.extend(python_text.getvalue().splitlines())


def quantize_summary(lines: list[str], out_type: str, tensors: int | None = None) -> str | None:
    """One sentence about the tensors llama.cpp's quantizer could not make ``out_type`` (their
    rows are not a multiple of its block) and what it used instead, from the ``lines`` it
    printed; None when there were none. ``tensors`` is how many the file has.

    For example: "llama.cpp's quantizer: 14 of 20 tensors are not q4_k_m because their rows
    (64, 128 values) are not a multiple of 256; it used q5_0 for 12 (instead of q4_K) and q8_0
    for 2 (instead of q6_K), so the file is a little larger and more precise."
    """
    fallbacks = [match.groups() for line in lines if (match := _FALLBACK.search(line))]
    if not fallbacks:
        return None
    of_total = f" of {tensors}" if tensors else ""
    widths = ", ".join(str(w) for w in sorted({int(ncols) for _, ncols, *_ in fallbacks}))
    blocks = " or ".join(str(b) for b in sorted({int(block) for _, _, block, *_ in fallbacks}))
    used = Counter((fallback, wanted) for *_, wanted, fallback in fallbacks)
    instead = " and ".join(
        f"{fallback} for {count} (instead of {wanted})"
        for (fallback, wanted), count in used.most_common()
    )
    return (
        f"llama.cpp's quantizer: {len(fallbacks)}{of_total} tensors are not {out_type} because "
        f"their rows ({widths} values) are not a multiple of {blocks}; it used {instead}, so "
        "the file is a little larger and more precise."
    )
