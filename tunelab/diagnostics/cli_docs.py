"""Write docs/cli.md from the argparse parser, so the command reference is the ``--help`` text.

    python -m tunelab.diagnostics.cli_docs --write    # regenerate docs/cli.md
    python -m tunelab.diagnostics.cli_docs --check    # exit 1 if docs/cli.md is out of date

tests/test_docs.py fails when docs/cli.md differs from what the parser produces now.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

WIDTH = 100  # fixed, so the text does not depend on the terminal it was generated in
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "cli.md"

HEADER = """\
# Command reference

Every `tunelab` command with its `--help` text. This page is generated from the argument parser
(`python -m tunelab.diagnostics.cli_docs --write`), and `tests/test_docs.py` fails when it no
longer matches, so it cannot drift from the tool.
"""


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public way to list sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for child in action.choices.values():
                if id(child) not in seen:  # aliases map to the same parser
                    seen.add(id(child))
                    yield child


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every sub-command's parser, depth first, in registration order."""
    yield parser
    for child in _subcommands(parser):
        yield from walk(child)


def help_text(parser: argparse.ArgumentParser) -> str:
    # typeshed's formatter_class protocol names only prog; every HelpFormatter takes width
    original = cast(type[argparse.HelpFormatter], parser.formatter_class)

    def fixed_width(prog: str) -> argparse.HelpFormatter:
        return original(prog, width=WIDTH)

    parser.formatter_class = fixed_width
    try:
        return parser.format_help().rstrip() + "\n"
    finally:
        parser.formatter_class = original


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference page as Markdown."""
    if parser is None:
        from tunelab.cli import build_parser

        parser = build_parser()
    parts = [HEADER]
    for command in walk(parser):
        parts.append(f"## `{command.prog}`\n\n```text\n{help_text(command)}```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(description="Generate or check docs/cli.md.")
    options.add_argument("--write", action="store_true", help="Rewrite the file.")
    options.add_argument("--check", action="store_true", help="Exit 1 if the file is stale.")
    options.add_argument("--path", default=str(DEFAULT_PATH), help="The reference file.")
    args = options.parse_args(argv)
    text = cli_reference()
    path = Path(args.path)
    if args.write:
        from tunelab.files import atomic_write_text

        atomic_write_text(path, text)
        print(f"Wrote {path}")
        return 0
    if args.check:
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            print(f"{path} is out of date: run python -m tunelab.diagnostics.cli_docs --write")
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
