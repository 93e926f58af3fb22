"""Linked views: a layer x expert heatmap whose cell clicks call Python.

:func:`linked_heatmap` turns a plotly heatmap figure (e.g. :func:`moelens.analysis.heatmap` of an
fTRI, nPMI or load table) into a ``plotly.graph_objects.FigureWidget`` that calls
``on_select(layer, expert)`` when a cell is clicked, e.g. to select the cell in the steering grid
or to show its expert card. The axes' labels are the layer and expert ids (as
:func:`moelens.analysis.heatmap` writes them: layers on y, experts on x); a figure whose axis
titles say ``layer`` on x and ``expert`` on y is read the other way round.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plotly.graph_objects as go

_TRAILING_INTEGER = re.compile(r"(-?\d+)\s*$")


def linked_heatmap(figure: go.Figure, on_select: Callable[[int, int], None]) -> go.FigureWidget:
    """A ``FigureWidget`` of ``figure`` whose heatmap cell clicks call ``on_select(layer, expert)``.

    Every heatmap trace of the figure is linked. A click is mapped through the clicked point's
    axis labels (``points.xs`` / ``points.ys``): an integer, or a label ending in one (``"5"``,
    ``"L3"``, ``"expert 12"``) gives the id. Raises ``ValueError`` for a figure without a heatmap,
    and ``ImportError`` (saying what to install) when plotly's ``FigureWidget`` is unavailable.
    """
    import plotly.graph_objects as go

    heatmaps = [index for index, trace in enumerate(figure.data) if trace.type == "heatmap"]
    if not heatmaps:
        kinds = sorted({trace.type for trace in figure.data}) or ["no traces"]
        raise ValueError(f"linked_heatmap needs a figure with a heatmap trace; this one has {kinds}")
    try:
        widget = go.FigureWidget(figure)
    except ImportError as error:
        raise ImportError(f"linked heatmaps need plotly's FigureWidget: {error} (pip install 'moelens[notebook]')") from error
    for index in heatmaps:
        layer_on_x = _layer_on_x(widget, widget.data[index])

        def clicked(trace: Any, points: Any, selector: Any, layer_on_x: bool = layer_on_x) -> None:
            if not points.xs:  # plotly calls every trace's handlers; only the clicked trace has points
                return
            x, y = _label_id(points.xs[0]), _label_id(points.ys[0])
            on_select(*((x, y) if layer_on_x else (y, x)))

        widget.data[index].on_click(clicked)
    return widget


def _layer_on_x(figure: go.Figure, trace: Any) -> bool:
    """Whether the trace's x axis holds layers: its x axis title says ``layer`` or its y axis title says ``expert``."""

    def title(axis: str) -> str:
        name = getattr(trace, f"{axis}axis", None) or axis  # "x", "x2", ...
        layout_axis = figure.layout[f"{axis}axis{name[1:]}"]
        text = layout_axis.title.text if layout_axis is not None and layout_axis.title is not None else None
        return (text or "").strip().lower()

    return title("x") == "layer" or title("y") == "expert"


def _label_id(label: Any) -> int:
    """An axis label's id: an integer value, or the integer a string label ends with."""
    if isinstance(label, numbers.Real) and float(label).is_integer():
        return int(label)
    found = _TRAILING_INTEGER.search(str(label))
    if found is None:
        raise ValueError(f"heatmap axis label {label!r} names no layer or expert id (expected e.g. 5, '5' or 'L5')")
    return int(found.group(1))
