"""The knowledge-probe part of the eval report (HTML and Markdown), beside the held-out tables.

Each kind of probe gets its own table (every system, every headline metric with its 95%
interval), so unseen items and training items asked again are never averaged together.
"""

from __future__ import annotations

from html import escape
from typing import Any

from tunelab.evaluation.verdict import LABELS, PROBE_WORDS

HEADLINE = ("judge", "semantic", "token_f1", "rouge_l", "chrf", "loss")


def _shown(systems: dict[str, dict[str, dict[str, float | None]]]) -> tuple[str, ...]:
    """The headline metrics some system has a value for (no judge column when it was off)."""
    return tuple(
        m for m in HEADLINE if any(s.get(m, {}).get("mean") is not None for s in systems.values())
    )


def _value(metric: str, mean: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if metric == "loss" else f"{mean * 100:.1f}"


def _cell(metric: str, interval: dict[str, float | None]) -> str:
    return (
        f"{_value(metric, interval['mean'])} [{_value(metric, interval['low'])}, "
        f"{_value(metric, interval['high'])}]"
    )


def probes_html(data: dict[str, Any]) -> str:
    """One table per knowledge probe kind, from ``EvalResults.to_json()``; empty without probes."""
    parts = []
    for kind, probe in data.get("probes", {}).items():
        shown = _shown(probe["systems"])
        header = "".join(f"<th>{escape(LABELS[m])}</th>" for m in shown)
        rows = []
        for name, by_metric in probe["systems"].items():
            cells = "".join(
                f'<td class="num" data-probe="{escape(kind)}" data-system="{escape(name)}" '
                f'data-metric="{m}">{escape(_cell(m, by_metric[m]))}</td>'
                for m in shown
            )
            rows.append(f"<tr><th>{escape(name)}</th>{cells}</tr>")
        parts.append(
            f"<h3>{escape(PROBE_WORDS[kind].capitalize())}</h3><p>{probe['probes']} probes over "
            f"{probe['training_items']} training items; a training item's score is the mean "
            "over its probes, and intervals resample training items.</p>"
            f'<table id="probe-{escape(kind)}"><tr><th>system</th>{header}</tr>'
            f"{''.join(rows)}</table>"
        )
    if not parts:
        return ""
    return (
        "<h2>Knowledge probes: training items asked again</h2><p>Held-out items show skill and "
        "style on questions nobody trained on; these show what each system recalls of the "
        "training data itself (mean [95% CI]).</p>" + "".join(parts)
    )


def probes_markdown(data: dict[str, Any]) -> list[str]:
    """The same tables in Markdown, as lines."""
    lines: list[str] = []
    for kind, probe in data.get("probes", {}).items():
        shown = _shown(probe["systems"])
        lines += [
            "",
            f"## Knowledge probes: {PROBE_WORDS[kind]}",
            "",
            f"{probe['probes']} probes over {probe['training_items']} training items "
            "(mean [95% CI]).",
            "",
            "| system | " + " | ".join(LABELS[m] for m in shown) + " |",
            "|---" * (len(shown) + 1) + "|",
        ]
        for name, by_metric in probe["systems"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(m, by_metric[m]) for m in shown) + " |")
    return lines
