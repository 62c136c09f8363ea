"""The docs cannot drift: docs/cli.md is the parser's --help text, and every code block marked
runnable in docs/*.md and README.md runs and succeeds.

The convention (also in docs/index.md): a fenced block whose info string is ``bash runnable``
(optionally ``bash runnable exit=N`` when the block is meant to end with status N) is run with
``bash -euo pipefail`` in a fresh temporary folder that holds a copy of the repository's
``examples/`` (data files cut to their first lines), with these environment variables set:

- ``TUNELAB_MODEL``: a tiny model folder (2 layers), so ``${TUNELAB_MODEL:-smollm2-135m-instruct}``
  trains in seconds here and uses the real model when a reader runs the command;
- ``TUNELAB_MAX_STEPS``: 3, used the same way (``${TUNELAB_MAX_STEPS:-60}``);
- ``TUNELAB_DOCS_TEST``: 1, for anything else a block needs to shorten under test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.diagnostics.cli_docs import cli_reference

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```bash runnable(?P<options>[^\n]*)\n(?P<body>.*?)^```$", re.M | re.S)
DATA_LINES = 24
BLOCK_TIMEOUT = 300


def doc_files() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def runnable_blocks() -> list[tuple[str, str, int]]:
    """(name, script, expected exit status) of every runnable block."""
    blocks = []
    for path in doc_files():
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            status = re.search(r"exit=(\d+)", match["options"])
            name = f"{path.relative_to(ROOT)}:{line}"
            blocks.append((name, match["body"], int(status[1]) if status else 0))
    return blocks


def test_cli_reference_matches_the_parser():
    written = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert written == cli_reference(), (
        "docs/cli.md is out of date: run python -m tunelab.diagnostics.cli_docs --write"
    )


def test_cli_reference_lists_every_command():
    text = cli_reference()
    for command in ("train", "doctor", "runs list", "runs compare", "data inspect"):
        assert f"## `tunelab {command}`" in text


def test_runnable_blocks_are_found():
    names = [name for name, _, _ in runnable_blocks()]
    assert any(name.startswith("docs/troubleshooting.md") for name in names)
    text = "```bash runnable exit=1\necho hi\nexit 1\n```\n"
    match = FENCE.search(text)
    assert match and match["body"] == "echo hi\nexit 1\n" and "exit=1" in match["options"]


@pytest.fixture(scope="module")
def docs_workspace(tmp_path_factory) -> Path:
    """A copy of examples/ with short data files, the folder each block starts from."""
    base = tmp_path_factory.mktemp("docs-examples")
    for source in (ROOT / "examples").rglob("*"):
        target = base / "examples" / source.relative_to(ROOT / "examples")
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.suffix == ".jsonl":
            target.parent.mkdir(parents=True, exist_ok=True)
            lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
            target.write_text("".join(lines[:DATA_LINES]), encoding="utf-8")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    return base


BLOCKS = runnable_blocks()


@pytest.mark.parametrize(("name", "script", "status"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_runnable_block(name, script, status, docs_workspace, tiny_model_dir, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(docs_workspace, workdir)
    env = dict(
        os.environ,
        TUNELAB_MODEL=str(tiny_model_dir),
        TUNELAB_MAX_STEPS="3",
        TUNELAB_DOCS_TEST="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert result.returncode == status, (
        f"{name} exited {result.returncode}, expected {status}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}"
    )
