"""The evaluation report: one self-contained HTML page, the same in Markdown, and the JSON.

The HTML needs no network and no script: tables, inline SVG bar charts with 95% CI error bars,
the run's loss curves, side-by-side answers. Every number cell carries ``data-system`` and
``data-metric`` so a test (or a scraper) can read the values back from the rendered page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from markupsafe import Markup

from tunelab.evaluation.probe_report import probes_html, probes_markdown
from tunelab.evaluation.verdict import LABELS
from tunelab.files import atomic_write_text, json_text
from tunelab.html_pages import render
from tunelab.loss_curves import Curve, loss_svg, points
from tunelab.run_folder import EVAL_REPORT_FILES, EVAL_REPORT_HTML, EVAL_REPORT_MD, EVAL_RESULTS
from tunelab.text_safety import markdown_cell

COLOURS = {
    "base": "#8c8c8c",
    "few-shot": "#e0a030",
    "rag": "#3a8fd0",
    "sft": "#c0504d",
    "tuned": "#2e9e55",
    "tuned+rag": "#8a5cc8",
}
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
.charts{display:flex;flex-wrap:wrap;gap:12px}.answers td{vertical-align:top;max-width:260px;
font-size:90%}.verdict li{margin:.3em 0}small{color:#666}
"""


def _value(metric: str, mean: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if metric == "loss" else f"{mean * 100:.1f}"


def _scale(metric: str) -> float:
    return 1.0 if metric == "loss" else 100.0


def bar_chart(metric: str, summary: dict[str, Any], width: int = 340, height: int = 200) -> str:
    """An SVG bar per system with its 95% CI as an error bar."""
    systems = list(summary)
    scale = _scale(metric)
    values = {s: summary[s][metric] for s in systems}
    top = max([v.high * scale for v in values.values() if not math.isnan(v.high)] + [1e-9])
    left, bottom, plot_h = 40, 30, height - 60
    step = (width - left - 10) / max(len(systems), 1)
    bars = []
    for i, system in enumerate(systems):
        interval = values[system]
        if math.isnan(interval.mean):
            continue
        x = left + i * step + step * 0.15
        bar_w = step * 0.7
        h = interval.mean * scale / top * plot_h
        centre = x + bar_w / 2
        y_high = height - bottom - interval.high * scale / top * plot_h
        bars.append(
            {
                "system": system,
                "colour": COLOURS.get(system, "#666"),
                "x": f"{x:.1f}",
                "y": f"{height - bottom - h:.1f}",
                "width": f"{bar_w:.1f}",
                "height": f"{h:.1f}",
                "mean": _value(metric, interval.mean),
                "low": _value(metric, interval.low),
                "high": _value(metric, interval.high),
                "centre": f"{centre:.1f}",
                "left_tick": f"{centre - 5:.1f}",
                "y_low": f"{height - bottom - interval.low * scale / top * plot_h:.1f}",
                "y_high": f"{y_high:.1f}",
                "value_y": f"{max(y_high - 4, 28):.1f}",
            }
        )
    return Markup(
        render(
            "bar_chart.svg",
            width=width,
            height=height,
            left=left,
            bottom=bottom,
            label=LABELS[metric],
            unit=" (nats, lower is better)" if metric == "loss" else "",
            bars=bars,
        ).strip()
    )


def loss_chart(training: dict[str, Any], width: int = 700, height: int = 260) -> str:
    """Training and eval loss against step, from the run's metrics.jsonl."""

    def curve(name: str) -> list[tuple[float, float]]:
        return points([{"step": s, "loss": v} for s, v in training.get(name, [])], "loss")

    curves = [
        Curve("train loss", curve("train_curve"), "#2e9e55"),
        Curve("eval loss", curve("eval_curve"), "#d04a3a", markers=True),
    ]
    return loss_svg(
        curves,
        width,
        height,
        legend_width=110,
        empty="The run folder has no metrics.jsonl, so there are no loss curves.",
    )


def _sample(count: int, shown: int) -> list[int]:
    """Evenly spread item indices, so the sample is not just the first few questions."""
    if count <= shown:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(shown - 1, 1)) for i in range(shown)})


def html_report(results: Any, shown: int = 8) -> str:
    data = results.to_json()
    systems = list(results.systems)
    order = _metric_order(results.summary)
    rows = []
    for name in systems:
        s = data["systems"][name]
        cells = []
        for metric in (*order, "perplexity", "answer_words", "tokens_per_second",
                       "seconds_per_answer"):  # fmt: skip
            if metric in LABELS:
                interval = results.summary[name][metric]
                text = _value(metric, interval.mean)
                title = f"95% CI {_value(metric, interval.low)} to {_value(metric, interval.high)}"
            else:
                text = f"{s[metric]:.2f}" if metric != "answer_words" else f"{s[metric]:.1f}"
                title = ""
            cells.append({"metric": metric, "text": text, "title": title})
        rows.append({"system": name, "cells": cells})
    header = ["system", *(LABELS[m] for m in order), "perplexity", "answer words", "tokens/s",
              "s per answer"]  # fmt: skip
    differences = []
    for d in data["differences"]:
        if d["mean"] is None or d["metric"] not in order:
            continue
        scale = _scale(d["metric"])
        differences.append(
            {
                "first": d["first"],
                "second": d["second"],
                "label": LABELS[d["metric"]],
                "metric": d["metric"],
                "mean": f"{d['mean'] * scale:+.2f}",
                "interval": f"{d['low'] * scale:+.2f} to {d['high'] * scale:+.2f}",
                "real": "yes"
                if (d["low"] or 0) > 0 or (d["high"] or 0) < 0
                else "no (within noise)",
            }
        )
    samples = []
    for i in _sample(len(results.items), shown):
        item = data["items"][i]
        samples.append(
            {
                "question": item["question"],
                "origin": item["origin"],
                "terms": ", ".join(item["terms"]) or "none",
                "reference": item["reference"],
                "answers": [item["answers"][name] for name in systems],
            }
        )
    return render(
        "eval_report.html",
        css=Markup(CSS),
        title=f"tunelab evaluation: {Path(results.run_dir).name}",
        run_dir=results.run_dir,
        count=len(results.items),
        eval_path=results.eval_path,
        seconds=f"{results.seconds:.0f}",
        settings=json.dumps(data["settings"]),
        verdict=results.verdict,
        header=header,
        rows=rows,
        charts=[bar_chart(m, results.summary) for m in order],
        differences=differences,
        probes=probes_html(data),
        preference=_preference_rows(data["preference"]),
        forgetting=[
            {"system": name, "perplexity": f"{f['perplexity']:.2f}", "tokens": f["tokens"]}
            for name, f in (data["forgetting"] or {}).items()
        ],
        loss_chart=loss_chart(results.training),
        systems=systems,
        samples=samples,
    )


def _preference_rows(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The preference table's cells (a preference run's report; None otherwise)."""
    if not report:
        return None
    metrics = ("pairs", "logp_accuracy", "logp_margin", "reward_accuracy", "reward_margin")

    def text(metric: str, value: float | None) -> str:
        if value is None:
            return "-"  # no reward for the base model: it is the reference
        return f"{value:.1%}" if metric.endswith("accuracy") else f"{value:g}"

    rows = [
        {"system": name,
         "cells": [{"metric": m, "text": text(m, s.get(m))} for m in metrics]}
        for name, s in report["systems"].items()
    ]  # fmt: skip
    pairs = next(iter(report["systems"].values()))["pairs"]
    return {"eval_path": report["eval_path"], "beta": report["beta"], "pairs": pairs,
            "rows": rows}  # fmt: skip


def _metric_order(summary: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The headline metrics, leaving out those no system has a value for (the LLM judge when
    it was not asked for; the semantic metric without its package). Exact match stays in the
    JSON: on free-text answers it is almost always 0 and says nothing."""
    order = ("judge", "semantic", "token_f1", "rouge_l", "chrf", "term_score", "loss")
    return tuple(
        m
        for m in order
        if any(
            m in by_metric and not math.isnan(by_metric[m].mean) for by_metric in summary.values()
        )
    )


def markdown_report(results: Any, shown: int = 8) -> str:
    data = results.to_json()
    systems = list(results.systems)
    lines = [
        f"# Evaluation of {markdown_cell(results.run_dir)}",
        "",
        f"{len(results.items)} held-out examples from {markdown_cell(results.eval_path)}; "
        f"{results.seconds:.0f} s.",
        "",
        "## Verdict",
        "",
        *[f"- {markdown_cell(s)}" for s in results.verdict],
        "",
        "## Systems",
        "",
        "| system | "
        + " | ".join(LABELS[m] for m in _metric_order(results.summary))
        + " | perplexity | tokens/s | s per answer |",
        "|---" * (len(_metric_order(results.summary)) + 4) + "|",
    ]
    for name in systems:
        s = data["systems"][name]
        cells = []
        for m in _metric_order(results.summary):
            i = results.summary[name][m]
            cells.append(f"{_value(m, i.mean)} [{_value(m, i.low)}, {_value(m, i.high)}]")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {s['perplexity']:.2f} | {s['tokens_per_second']:.1f} | "
            f"{s['seconds_per_answer']:.2f} |"
        )
    lines += ["", "## Differences (paired bootstrap, 95% CI)", ""]
    lines += ["| pair | metric | difference | 95% CI |", "|---|---|---|---|"]
    for d in data["differences"]:
        if d["mean"] is None or d["metric"] not in _metric_order(results.summary):
            continue
        k = _scale(d["metric"])
        lines.append(
            f"| {d['first']} − {d['second']} | {LABELS[d['metric']]} | {d['mean'] * k:+.2f} | "
            f"{d['low'] * k:+.2f} to {d['high'] * k:+.2f} |"
        )
    lines += probes_markdown(data)
    if data["preference"]:
        from tunelab.evaluation.preference import format_preference_table

        table = format_preference_table(data["preference"]).replace("# Held-out", "## Held-out")
        lines += ["", *table.rstrip("\n").split("\n")]
    if data["forgetting"]:
        lines += ["", "## Forgetting (perplexity on general prose)", ""]
        lines += [f"- {n}: {f['perplexity']:.2f}" for n, f in data["forgetting"].items()]
    lines += ["", "## Answers side by side", ""]
    for i in _sample(len(results.items), shown):
        item = data["items"][i]
        lines += [
            f"### {_one_line(item['question'])}",
            "",
            f"- **reference**: {_one_line(item['reference'])}",
        ]
        lines += [f"- **{n}**: {_one_line(item['answers'][n])}" for n in systems]
        lines.append("")
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    # data and model output: HTML and Markdown markup escaped, so '<script>' stays text
    return markdown_cell(text)


REPORT_FILES = EVAL_REPORT_FILES


def write_reports(results: Any, folder: Path, shown: int = 8) -> dict[str, str]:
    """Write the three report files into ``folder`` and record them in its manifest; a file of
    the same name that tunelab did not write is refused (TunelabError), never replaced."""
    from tunelab.ownership import check_output_files, record_files

    check_output_files(folder, REPORT_FILES, "eval")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "html": folder / EVAL_REPORT_HTML,
        "markdown": folder / EVAL_REPORT_MD,
        "json": folder / EVAL_RESULTS,
    }
    atomic_write_text(files["html"], html_report(results, shown))
    atomic_write_text(files["markdown"], markdown_report(results, shown))
    atomic_write_text(files["json"], json_text(results.to_json(), indent=1) + "\n")
    record_files(folder, "report", files.values())
    return {k: str(v) for k, v in files.items()}
