"""Run folders as a collection: find them, read them, compare them (``tunelab runs``).

- ``folders``: :class:`Run`, ``find_runs``, ``load_run``;
- ``checks``: ``check_run_files`` (is a saved run or model folder whole?);
- ``tables``: the text tables of ``runs list`` and ``runs compare``;
- ``compare``: the comparison text, PNG and HTML page;
- ``cli``: the ``runs`` subcommands.

The layout of one run folder and the readers of its files are in :mod:`tunelab.run_folder`.
"""

from tunelab.run_folder import CONFIG as RUN_CONFIG
from tunelab.run_folder import damaged_run_fix
from tunelab.runs.checks import check_run_files
from tunelab.runs.compare import compare_html, compare_runs, plot_png
from tunelab.runs.folders import Run, find_runs, load_run
from tunelab.runs.tables import differing_config, list_runs

__all__ = [
    "RUN_CONFIG",
    "Run",
    "check_run_files",
    "compare_html",
    "compare_runs",
    "damaged_run_fix",
    "differing_config",
    "find_runs",
    "list_runs",
    "load_run",
    "plot_png",
]
