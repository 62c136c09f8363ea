"""The knowledge-probe part of the eval report (HTML and Markdown), beside the held-out tables.

Each kind of probe gets its own table (every system, every headline metric with its 95%
interval), so unseen items and training items asked again are never averaged together.
"""

from __future__ import annotations

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
    from markupsafe import Markup

    from tunelab.html_pages import render

    tables = []
    for kind, probe in data.get("probes", {}).items():
        shown = _shown(probe["systems"])
        rows = [
            {
                "system": name,
                "cells": [{"metric": m, "text": _cell(m, by_metric[m])} for m in shown],
            }
            for name, by_metric in probe["systems"].items()
        ]
        tables.append(
            {
                "kind": kind,
                "title": PROBE_WORDS[kind].capitalize(),
                "probes": probe["probes"],
                "training_items": probe["training_items"],
                "labels": [LABELS[m] for m in shown],
                "rows": rows,
            }
        )
    return Markup(render("probes.html", tables=tables).strip())


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


def probes_text(data: dict[str, Any]) -> list[str]:
    """Every system on the held-out items and on each probe kind side by side, as plain-text
    lines: the headline answer metric (semantic similarity, else token F1) and the reference
    loss, each with its 95% interval, from ``EvalResults.to_json()`` (eval_results.json)."""
    metric = "semantic" if data["settings"].get("semantic_model") else "token_f1"
    kinds = {"held-out": data["systems"]}
    kinds |= {kind: probe["systems"] for kind, probe in data.get("probes", {}).items()}
    width = 44
    lines = [
        f"{'system':<10}" + "".join(f"{kind:>{width}}" for kind in kinds),
        f"{'':<10}" + f"{LABELS[metric] + ' / loss':>{width}}" * len(kinds),
    ]
    for name in data["systems"]:
        cells = [
            f"{_cell(metric, systems[name][metric])} / {_cell('loss', systems[name]['loss'])}"
            for systems in kinds.values()
        ]
        lines.append(f"{name:<10}" + "".join(f"{cell:>{width}}" for cell in cells))
    return lines
