"""``tunelab runs list | compare`` on the command line."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.run_folder import CONFIG
from tunelab.runs.compare import compare_runs
from tunelab.runs.tables import list_runs
from tunelab.text_safety import visible


def add_runs_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``runs list`` and ``runs compare`` on an argparse subparsers object."""
    runs = subparsers.add_parser("runs", help="List run folders and compare runs.")
    commands = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = commands.add_parser(
        "list", help=f"Find run folders (by {CONFIG}) and show their metrics."
    )
    listing.add_argument(
        "root", nargs="?", default="outputs", help="Folder searched recursively (default: outputs)."
    )
    listing.set_defaults(func=lambda args: print(visible(list_runs(args.root))) or 0)
    compare = commands.add_parser(
        "compare",
        help="Config differences, final and best metrics, and overlaid loss curves of runs.",
        description="Prints the config keys that differ and each run's metrics; writes "
        "loss_curves.png and a self-contained compare.html into --out.",
    )
    compare.add_argument("runs", nargs="+", help="Two or more run folders.")
    compare.add_argument(
        "--out",
        default="runs-compare",
        help="Folder for loss_curves.png and compare.html (default: runs-compare).",
    )
    compare.add_argument("--no-plot", action="store_true", help="Skip the PNG (HTML only).")
    compare.set_defaults(
        func=lambda args: print(visible(compare_runs(args.runs, args.out, not args.no_plot))) or 0
    )
    return runs
