"""Matplotlib figures for files, made without pyplot: the global backend (a notebook's inline
one, a desktop's window) is left as the user set it."""

from __future__ import annotations

from typing import Any

from tunelab.errors import TunelabError


def new_figure(figsize: tuple[float, float]) -> Any:
    """A ``matplotlib.figure.Figure`` drawn by the Agg canvas, not registered with pyplot (so
    nothing needs closing and no backend is switched); TunelabError when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (a missing matplotlib is named here, not deep below)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TunelabError(
            "plots need matplotlib, which is not installed. Install it with: pip install matplotlib"
        ) from None
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure
