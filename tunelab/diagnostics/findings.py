"""One problem found in a run: how bad it is, the numbers that show it, and what to change."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# "error": the run is broken; "warning": the run likely learned less than it could;
# "info": worth knowing, nothing to fix. Only errors and warnings make doctor exit non-zero.
SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    code: str  # stable name for scripts and tests, e.g. "loss_diverging"
    severity: str
    title: str
    evidence: str
    fix: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_problem(finding: Finding) -> bool:
    return finding.severity in ("error", "warning")


def format_findings(run_dir: str, findings: list[Finding]) -> str:
    """The findings as text, worst first, each with its evidence and fix."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    problems = sum(is_problem(f) for f in findings)
    lines = [f"Run {run_dir}: {problems} problem(s), {len(findings) - problems} note(s)."]
    if not findings:
        lines.append("No problems found in the metrics, data, tokenizer or chat template.")
    for finding in sorted(findings, key=lambda f: order[f.severity]):
        lines += [
            "",
            f"[{finding.severity.upper()}] {finding.title} ({finding.code})",
            f"  evidence: {finding.evidence}",
            f"  fix:      {finding.fix}",
        ]
    return "\n".join(lines)
