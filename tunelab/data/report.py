"""The data report, from a prepare manifest: Markdown, and one self-contained HTML page with
inline SVG histograms (no scripts, no external files).

Every piece of dataset text goes through ``html.escape`` in the HTML page and through
``text_safety.markdown_cell`` in the Markdown one: a dataset can hold anything, ``<script>``
included, and a report must never run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.data.prepare import format_summary
from tunelab.text_safety import markdown_cell


def _steps(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in manifest.get("steps", []) if s["kind"] != "load"]


def _step_count(step: dict[str, Any]) -> str:
    if step["kind"] == "edit":
        removed = step.get("removed_chars")
        return f"{step['changed']} changed" + (
            f" ({removed} characters removed)" if removed else ""
        )
    if step["kind"] == "filter":
        reasons = ", ".join(f"{n} {r}" for r, n in step.get("reasons", {}).items())
        return f"{step['dropped']} dropped" + (f" ({reasons})" if reasons else "")
    if step["kind"] == "add":
        return f"{step['added']} added"
    if step["kind"] == "mask":
        return f"{step['masked']} empty assistant turns left out of the loss"
    return f"{step.get('moved', 0)} moved to eval"


def _bias_rows(report: dict[str, Any] | None) -> list[tuple[str, str, int, int, str]]:
    rows = []
    for dimension, info in (report or {}).get("dimensions", {}).items():
        ratio = info["imbalance_ratio"]
        shown = (
            f"{ratio:g}" if ratio is not None else "inf (absent: " + ", ".join(info["absent"]) + ")"
        )
        for group, mentions in info["mentions"].items():
            rows.append((dimension, group, mentions, info["examples"][group], shown))
    return rows


def _truncation_line(split: str, section: dict[str, Any]) -> str:
    return (
        f"{split}: {section['truncated']} examples ({section['truncation_rate']:.1%}) longer "
        f"than max_length {section['max_length']} tokens (truncated in training)."
    )


def _leakage_line(leakage: dict[str, Any]) -> str:
    return (
        f"{leakage['exact']} exact and {leakage['near']} near overlaps between training and eval "
        f"examples; {leakage['dropped']} training examples dropped."
    )


# --- Markdown -------------------------------------------------------------------------------


def _md_cell(text: Any) -> str:
    # dataset text: HTML escaped (Markdown viewers pass HTML through), markup and pipes inert
    return markdown_cell(text)


def _sample_rows(manifest: dict[str, Any]) -> list[list[Any]]:
    """The example rows each step kept (split, step, origin, reason, before, after)."""
    return [
        [
            s["split"],
            s["step"],
            e.get("origin", ""),
            e.get("reason", ""),
            e.get("before", e.get("text", "")),
            e.get("after", ""),
        ]
        for s in _steps(manifest)
        for e in s.get("examples", [])
    ]


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(manifest: dict[str, Any]) -> str:
    """The report as Markdown (dataset text in tables with '|' escaped)."""
    out = ["# Data report", "", format_summary(manifest), ""]
    out += ["## Steps", ""]
    out += _md_table(
        ["split", "step", "result", "seconds"],
        [[s["split"], s["step"], _step_count(s), s.get("seconds", "")] for s in _steps(manifest)],
    )
    samples = _sample_rows(manifest)
    if samples:
        out += ["### Example rows per step", ""]
        out += _md_table(
            ["split", "step", "origin", "reason", "before / dropped text", "after"], samples
        )
    out += _md_lengths(manifest)
    duplicates = manifest.get("duplicates", {}).get("examples", [])
    if duplicates:
        out += ["## Duplicates", ""]
        out += _md_table(
            ["kind", "origin", "duplicate of", "similarity", "text"],
            [
                [d["kind"], d["origin"], d["duplicate_of"], d["similarity"], d["text"]]
                for d in duplicates
            ],
        )
    leakage = manifest.get("leakage")
    if leakage:
        out += ["## Train/eval leakage", "", _leakage_line(leakage), ""]
        if leakage["examples"]:
            out += _md_table(
                ["train origin", "eval origin", "similarity", "text"],
                [
                    [x["origin"], x["eval_origin"], x["similarity"], x["text"]]
                    for x in leakage["examples"]
                ],
            )
    pii = manifest.get("pii", {})
    out += ["## PII", ""]
    out += _md_table(
        ["split", "type", "count"],
        [[s, k, n] for s in ("train", "eval") for k, n in (pii.get(s) or {}).items()],
    )
    if pii.get("examples"):
        out += _md_table(
            ["origin", "type", "redacted context"],
            [[x["origin"], x["type"], x["snippet"]] for x in pii["examples"]],
        )
    bias_section = manifest.get("bias")
    if bias_section:
        out += ["## Bias", ""]
        for label in ("before", "after"):
            if bias_section.get(label):
                out += [f"### {label.capitalize()} mitigation ({bias_section['mitigation']})", ""]
                out += _md_table(
                    ["dimension", "group", "mentions", "examples", "imbalance ratio"],
                    [list(r) for r in _bias_rows(bias_section[label])],
                )
        flagged = bias_section["before"]["flagged"]
        if flagged:
            out += [
                f"Flagged (one group named {flagged[0]['mentions']}+ times, no other): "
                f"{bias_section['before']['flagged_count']}",
                "",
            ]
            out += _md_table(
                ["origin", "dimension", "group", "terms"],
                [[f["origin"], f["dimension"], f["group"], ", ".join(f["terms"])] for f in flagged],
            )
    return "\n".join(out)


def _md_lengths(manifest: dict[str, Any]) -> list[str]:
    out = ["## Lengths", ""]
    rows = []
    for split, section in (manifest.get("lengths") or {}).items():
        for unit in ("chars", "tokens"):
            stats = section.get(unit)
            if stats:
                rows.append(
                    [
                        split,
                        unit,
                        stats["count"],
                        stats["mean"],
                        stats["p50"],
                        stats["p95"],
                        stats["max"],
                    ]
                )
        if "truncated" in section:
            out.append(_truncation_line(split, section))
    return out + [""] + _md_table(["split", "unit", "count", "mean", "p50", "p95", "max"], rows)


# --- HTML -----------------------------------------------------------------------------------


def histogram_svg(stats: dict[str, Any], title: str, width: int = 480, height: int = 160) -> str:
    """An inline SVG bar chart of a length histogram."""
    from markupsafe import Markup

    from tunelab.html_pages import render

    counts = stats["histogram"]["counts"]
    edges = stats["histogram"]["edges"]
    top = max(counts) or 1
    bar = (width - 40) / max(len(counts), 1)
    bars = []
    for i, count in enumerate(counts):
        h = (height - 40) * count / top
        bars.append(
            {
                "x": f"{30 + i * bar:.1f}",
                "y": f"{height - 20 - h:.1f}",
                "width": f"{max(bar - 1, 1):.1f}",
                "height": f"{h:.1f}",
                "label": f"{edges[i]:g}-{edges[i + 1]:g}: {count}",
            }
        )
    return Markup(
        render(
            "histogram.svg",
            width=width,
            height=height,
            title=title,
            caption=f"{title} (n={stats['count']}, max {stats['max']})",
            bars=bars,
            first=f"{edges[0]:g}",
            last=f"{edges[-1]:g}",
        ).strip()
    )


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:4px 8px;"
    "vertical-align:top;text-align:left;font-size:13px}td{white-space:pre-wrap;max-width:420px}"
    "th{background:#f2f2f2}"
)


def render_html(manifest: dict[str, Any]) -> str:
    """The report as one HTML page (tunelab/templates/data_report.html); every dataset string
    is escaped."""
    from markupsafe import Markup

    from tunelab.html_pages import render

    lengths = []
    for split, section in (manifest.get("lengths") or {}).items():
        units = [u for u in ("tokens", "chars") if section.get(u)]
        lengths.append(
            {
                "histograms": [
                    histogram_svg(section[u], f"{split} {u} per example") for u in units
                ],
                "truncation": _truncation_line(split, section) if "truncated" in section else "",
            }
        )
    leakage = manifest.get("leakage")
    pii = manifest.get("pii", {})
    bias_section = manifest.get("bias")
    bias = None
    if bias_section:
        flagged = bias_section["before"]["flagged"]
        bias = {
            "sections": [
                {
                    "title": f"{label.capitalize()} mitigation ({bias_section['mitigation']})",
                    "rows": [list(r) for r in _bias_rows(bias_section[label])],
                }
                for label in ("before", "after")
                if bias_section.get(label)
            ],
            "flagged_count": bias_section["before"].get("flagged_count"),
            "flagged": [
                [f["origin"], f["dimension"], f["group"], ", ".join(f["terms"])] for f in flagged
            ],
        }
    return render(
        "data_report.html",
        style=Markup(_STYLE),
        summary=format_summary(manifest),
        steps=[
            [s["split"], s["step"], _step_count(s), s.get("seconds", "")] for s in _steps(manifest)
        ],
        samples=_sample_rows(manifest),
        lengths=lengths,
        duplicates=[
            [d["kind"], d["origin"], d["duplicate_of"], d["similarity"], d["text"]]
            for d in manifest.get("duplicates", {}).get("examples", [])
        ],
        leakage={
            "line": _leakage_line(leakage),
            "rows": [
                [x["origin"], x["eval_origin"], x["similarity"], x["text"]]
                for x in leakage["examples"]
            ],
        }
        if leakage
        else None,
        pii_counts=[[s, k, n] for s in ("train", "eval") for k, n in (pii.get(s) or {}).items()],
        pii_examples=[[x["origin"], x["type"], x["snippet"]] for x in pii.get("examples") or []],
        bias=bias,
    )


def write_reports(manifest: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown, page = folder / "report.md", folder / "report.html"
    from tunelab.files import atomic_write_text

    atomic_write_text(markdown, render_markdown(manifest) + "\n")
    atomic_write_text(page, render_html(manifest) + "\n")
    return markdown, page
