"""The data report, from a prepare manifest: Markdown, and one self-contained HTML page with
inline SVG histograms (no scripts, no external files).

Every piece of dataset text goes through ``html.escape`` in the HTML page and through
``text_safety.markdown_cell`` in the Markdown one: a dataset can hold anything, ``<script>``
included, and a report must never run it.
"""

from __future__ import annotations

import html
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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def histogram_svg(stats: dict[str, Any], title: str, width: int = 480, height: int = 160) -> str:
    """An inline SVG bar chart of a length histogram."""
    counts = stats["histogram"]["counts"]
    edges = stats["histogram"]["edges"]
    top = max(counts) or 1
    bar = (width - 40) / max(len(counts), 1)
    bars = []
    for i, count in enumerate(counts):
        h = (height - 40) * count / top
        x, y = 30 + i * bar, height - 20 - h
        label = f"{edges[i]:g}-{edges[i + 1]:g}: {count}"
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
            f'fill="#4a7bd0"><title>{_e(label)}</title></rect>'
        )
    caption = f"{title} (n={stats['count']}, max {stats['max']})"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(title)}"><text x="30" y="14" font-size="12">{_e(caption)}</text>'
        + "".join(bars)
        + f'<text x="30" y="{height - 5}" font-size="10">{edges[0]:g}</text>'
        f'<text x="{width - 10}" y="{height - 5}" font-size="10" text-anchor="end">'
        f"{edges[-1]:g}</text></svg>"
    )


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:4px 8px;"
    "vertical-align:top;text-align:left;font-size:13px}td{white-space:pre-wrap;max-width:420px}"
    "th{background:#f2f2f2}"
)


def render_html(manifest: dict[str, Any]) -> str:
    """The report as one HTML page; every dataset string is escaped."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunelab data report</title>"
        f"<style>{_STYLE}</style></head><body>"
    ]
    parts.append(f"<h1>Data report</h1><p>{_e(format_summary(manifest))}</p>")
    parts.append("<h2>Steps</h2>")
    parts.append(
        _html_table(
            ["split", "step", "result", "seconds"],
            [
                [s["split"], s["step"], _step_count(s), s.get("seconds", "")]
                for s in _steps(manifest)
            ],
        )
    )
    samples = _sample_rows(manifest)
    if samples:
        parts.append("<h3>Example rows per step</h3>")
        parts.append(
            _html_table(
                ["split", "step", "origin", "reason", "before / dropped text", "after"], samples
            )
        )
    parts.append("<h2>Lengths</h2>")
    for split, section in (manifest.get("lengths") or {}).items():
        for unit in ("tokens", "chars"):
            if section.get(unit):
                parts.append(histogram_svg(section[unit], f"{split} {unit} per example"))
        if "truncated" in section:
            parts.append(f"<p>{_e(_truncation_line(split, section))}</p>")
    duplicates = manifest.get("duplicates", {}).get("examples", [])
    if duplicates:
        parts.append("<h2>Duplicates</h2>")
        parts.append(
            _html_table(
                ["kind", "origin", "duplicate of", "similarity", "text"],
                [
                    [d["kind"], d["origin"], d["duplicate_of"], d["similarity"], d["text"]]
                    for d in duplicates
                ],
            )
        )
    leakage = manifest.get("leakage")
    if leakage:
        parts.append(f"<h2>Train/eval leakage</h2><p>{_e(_leakage_line(leakage))}</p>")
        parts.append(
            _html_table(
                ["train origin", "eval origin", "similarity", "text"],
                [
                    [x["origin"], x["eval_origin"], x["similarity"], x["text"]]
                    for x in leakage["examples"]
                ],
            )
        )
    pii = manifest.get("pii", {})
    parts.append("<h2>PII</h2>")
    parts.append(
        _html_table(
            ["split", "type", "count"],
            [[s, k, n] for s in ("train", "eval") for k, n in (pii.get(s) or {}).items()],
        )
    )
    if pii.get("examples"):
        parts.append(
            _html_table(
                ["origin", "type", "redacted context"],
                [[x["origin"], x["type"], x["snippet"]] for x in pii["examples"]],
            )
        )
    bias_section = manifest.get("bias")
    if bias_section:
        parts.append("<h2>Bias</h2>")
        for label in ("before", "after"):
            if bias_section.get(label):
                parts.append(
                    f"<h3>{label.capitalize()} mitigation ({_e(bias_section['mitigation'])})</h3>"
                )
                parts.append(
                    _html_table(
                        ["dimension", "group", "mentions", "examples", "imbalance ratio"],
                        [list(r) for r in _bias_rows(bias_section[label])],
                    )
                )
        flagged = bias_section["before"]["flagged"]
        if flagged:
            parts.append(f"<p>Flagged examples: {bias_section['before']['flagged_count']}</p>")
            parts.append(
                _html_table(
                    ["origin", "dimension", "group", "terms"],
                    [
                        [f["origin"], f["dimension"], f["group"], ", ".join(f["terms"])]
                        for f in flagged
                    ],
                )
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(manifest: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown, page = folder / "report.md", folder / "report.html"
    from tunelab.files import atomic_write_text

    atomic_write_text(markdown, render_markdown(manifest) + "\n")
    atomic_write_text(page, render_html(manifest) + "\n")
    return markdown, page
