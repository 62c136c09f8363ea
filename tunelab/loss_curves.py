"""Loss curves, drawn one way for every page and picture that shows them: the PNG written after
training, the PNG and HTML of ``tunelab runs compare``, and the evaluation report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Curve:
    """One line: (optimizer step, loss) points, a legend label and how it is drawn."""

    label: str
    points: list[tuple[float, float]]
    color: str | None = None  # None: matplotlib's next colour (SVG needs one)
    dashed: bool = False
    markers: bool = False


def points(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of the records that hold a finite ``key`` (NaN/inf are not drawn)."""
    return [
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and math.isfinite(r[key]) and "step" in r
    ]


def draw_loss(axes: Any, curves: list[Curve], markersize: float | None = None) -> None:
    """Plot ``curves`` on a matplotlib ``Axes`` and label it; empty curves are left out."""
    for curve in curves:
        if not curve.points:
            continue
        steps, values = zip(*curve.points, strict=True)
        style = ("--" if curve.dashed else "-") + ("o" if curve.markers else "")
        options: dict[str, Any] = {"label": curve.label}
        if curve.color is not None:
            options["color"] = curve.color
        if curve.markers and markersize is not None:
            options["markersize"] = markersize
        axes.plot(steps, values, style, **options)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")


def loss_svg(
    curves: list[Curve],
    width: int = 820,
    height: int = 420,
    legend_width: int = 200,
    empty: str = "No loss values logged yet.",
) -> str:
    """The curves as an inline SVG (no JavaScript, no external files): a frame with five
    ticks per axis, one polyline per curve (eval dots when ``markers``) and a legend on the
    right; a paragraph saying ``empty`` when no curve has a point."""
    from markupsafe import Markup

    from tunelab.html_pages import render

    drawn = [c for c in curves if c.points]
    if not drawn:
        return Markup(render("loss_empty.html", message=empty))
    left, right, top, bottom = 60, legend_width, 20, 40
    every = [p for c in drawn for p in c.points]
    x_min, x_max = min(p[0] for p in every), max(p[0] for p in every)
    y_min, y_max = min(p[1] for p in every), max(p[1] for p in every)
    x_span, y_span = (x_max - x_min) or 1.0, (y_max - y_min) or 1.0

    def x(v: float) -> float:
        return left + (v - x_min) / x_span * (width - left - right)

    def y(v: float) -> float:
        return top + (y_max - v) / y_span * (height - top - bottom)

    ticks = [
        {
            "y": f"{y(y_min + y_span * i / 4) + 4:.1f}",
            "loss": f"{y_min + y_span * i / 4:.3f}",
            "x": f"{x(x_min + x_span * i / 4):.1f}",
            "step": f"{x_min + x_span * i / 4:.0f}",
        }
        for i in range(5)
    ]
    lines = [
        {
            "label": c.label,
            "color": c.color or COLORS[i % len(COLORS)],
            "dashed": c.dashed,
            "coords": " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in c.points),
            "dots": [(f"{x(a):.1f}", f"{y(b):.1f}") for a, b in c.points] if c.markers else [],
            "legend_y": top + 10 + 16 * i,
        }
        for i, c in enumerate(drawn)
    ]
    return Markup(
        render(
            "loss_curves.svg",
            width=width,
            height=height,
            left=left,
            right=right,
            top=top,
            bottom=bottom,
            ticks=ticks,
            lines=lines,
        )
    )
