"""``tunelab doctor [RUN_DIR]``: parse, call the diagnostics, print. Nothing more."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tunelab.text_safety import visible

DOCTOR_DESCRIPTION = """\
Without RUN_DIR: report this machine (Python and library versions, CPU bf16 features, CUDA
devices, RAM, disk, the model cache) and the precision and batch size tunelab would choose here.

With RUN_DIR: read the run's metrics.jsonl, results.json, tunelab_config.yaml, run_info.json,
data and tokenizer, and report each problem with its evidence and a fix: files cut off while
saved, NaN or diverging loss (even from one metrics line), flat loss, an empty loss mask,
overfitting, truncated examples, padding, chat template mismatch, pad = EOS masking the end of
answers, gradient norm spikes.

Exit status: 0 when nothing (or only notes) was found, 1 when a problem (warning or error) was
found, 2 when RUN_DIR cannot be read."""


def add_doctor_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``doctor`` on an argparse subparsers object."""
    doctor = subparsers.add_parser(
        "doctor",
        help="Check this machine, or diagnose a run folder's problems.",
        description=DOCTOR_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument(
        "run_dir", nargs="?", default=None, help="A run folder (output_dir of 'tunelab train')."
    )
    doctor.add_argument("--json", action="store_true", help="Print the report as JSON.")
    doctor.set_defaults(func=doctor_command)
    return doctor


def doctor_command(args: argparse.Namespace) -> int:
    if args.run_dir is None:
        from tunelab.diagnostics.environment import environment_report, format_report, report_dict

        sections = environment_report()
        print(
            json.dumps(report_dict(sections), indent=2)
            if args.json
            else visible(format_report(sections))
        )
        return 0
    from tunelab.diagnostics.findings import format_findings, is_problem
    from tunelab.diagnostics.run_report import diagnose_run, findings_json

    findings = diagnose_run(args.run_dir)
    text = findings_json if args.json else format_findings
    print(visible(text(args.run_dir, findings)))  # findings quote data and configs
    return 1 if any(is_problem(f) for f in findings) else 0
