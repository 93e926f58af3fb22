"""Plotly figures for the analysis tables; :func:`write_html` exports them to work offline.

Every figure function takes a result table of :mod:`moelens.analysis` (or a trace, for the token
view) and returns a ``plotly.graph_objects.Figure`` in the ``moelens`` template: transparent
backgrounds and mid-grey text and grid lines, so a figure reads on JupyterLab's light and dark
themes alike (plotly draws into SVG and cannot follow the page's CSS variables).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moelens.analysis.stats import literal, query

if TYPE_CHECKING:
    import os

    import pandas as pd
    import plotly.graph_objects as go

    from moelens.store import Trace

# columns whose sign matters get a diverging colour scale centred on 0
_SIGNED = {"difference", "log_odds", "npmi", "score"}
# readable on white (4.5:1) and on JupyterLab's dark background (#111, 4.2:1)
_TEXT_GREY = "#767676"
_GRID_GREY = "rgba(128, 128, 128, 0.3)"


def template() -> go.layout.Template:
    """The ``moelens`` plotly template (registered in ``plotly.io.templates`` on first use)."""
    import plotly.graph_objects as go
    import plotly.io as pio

    if "moelens" not in pio.templates:
        axis = {"gridcolor": _GRID_GREY, "zerolinecolor": _GRID_GREY, "linecolor": _GRID_GREY}
        pio.templates["moelens"] = go.layout.Template(
            layout={
                "paper_bgcolor": "rgba(0, 0, 0, 0)",
                "plot_bgcolor": "rgba(0, 0, 0, 0)",
                "font": {"color": _TEXT_GREY},
                "xaxis": axis,
                "yaxis": axis,
                "colorway": _categorical(10),
            }
        )
    return pio.templates["moelens"]


def _categorical(count: int) -> list[str]:
    """``count`` distinct colours for categories (expert ids): plotly's qualitative sets, cycled."""
    import plotly.colors as colors

    palette = colors.qualitative.Dark24 + colors.qualitative.Light24
    return [palette[i % len(palette)] for i in range(count)]


def heatmap(table: pd.DataFrame, value: str, *, title: str | None = None) -> go.Figure:
    """A layer x expert heatmap of ``table[value]`` (one row per (layer, expert); missing cells blank).

    Works for :func:`~moelens.analysis.ftri.ftri_scores` (``difference``, ``log_odds``), nPMI (``npmi``,
    ``score``) and :func:`~moelens.analysis.stats.expert_frequency` (``frequency``, ``share``; other
    grouping columns must be filtered out first).
    """
    import plotly.graph_objects as go

    grid = table.pivot_table(index="layer", columns="expert", values=value, aggfunc="first")
    signed = value in _SIGNED
    limit = float(abs(grid).max().max()) if signed and grid.size else None
    figure = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[str(e) for e in grid.columns],
            y=[str(layer) for layer in grid.index],
            colorscale="RdBu_r" if signed else "Viridis",
            zmid=0 if signed else None,
            zmin=-limit if limit else None,
            zmax=limit if limit else None,
            colorbar={"title": {"text": value}},
            hovertemplate="layer %{y}, expert %{x}<br>" + value + " %{z:.4g}<extra></extra>",
            name=value,
        )
    )
    figure.update_layout(
        template=template(), title=title or f"{value} by layer and expert", xaxis_title="expert", yaxis_title="layer", yaxis_type="category", xaxis_type="category"
    )
    return figure


def ranked_bars(table: pd.DataFrame, value: str, *, n: int = 20, title: str | None = None) -> go.Figure:
    """Horizontal bars of the first ``n`` rows of a ranked table, labelled ``L<layer> E<expert>``."""
    import plotly.graph_objects as go

    top = table.head(n)
    labels = [f"L{layer} E{expert}" for layer, expert in zip(top["layer"], top["expert"])]
    figure = go.Figure(go.Bar(x=top[value], y=labels, orientation="h", name=value))
    figure.update_layout(template=template(), title=title or f"top {len(top)} experts by {value}", xaxis_title=value, yaxis={"autorange": "reversed", "type": "category"})
    return figure


def coactivation_matrix(pairs: pd.DataFrame, layer: int, *, num_experts: int | None = None, title: str | None = None) -> go.Figure:
    """The symmetric expert x expert co-activation counts of one layer from
    :func:`~moelens.analysis.stats.coactivation`: each cell the tokens that chose both experts."""
    import numpy as np
    import plotly.graph_objects as go

    rows = pairs[pairs["layer"] == layer]
    size = num_experts or int(max(rows["expert_a"].max(), rows["expert_b"].max(), -1)) + 1
    matrix = np.zeros((size, size), dtype=np.int64)
    # several groups (``by``) add up: the matrix shows the layer as a whole
    np.add.at(matrix, (rows["expert_a"].to_numpy(int), rows["expert_b"].to_numpy(int)), rows["tokens"].to_numpy(np.int64))
    matrix = matrix + matrix.T
    figure = go.Figure(
        go.Heatmap(z=matrix, colorscale="Viridis", name=f"layer {layer}", hovertemplate="experts %{y} & %{x}: %{z}<extra></extra>")
    )
    figure.update_layout(template=template(), title=title or f"co-activation, layer {layer}", xaxis_title="expert", yaxis_title="expert")
    return figure


def token_view(trace: Trace, prompt_id: Any, layer: int, *, tokens_per_line: int = 16, title: str | None = None) -> go.Figure:
    """A prompt's tokens as readable text, each coloured by its first-choice (rank 0) expert at ``layer``.

    Colours are categorical (one distinct colour per expert id; no order implied). Tokens show as
    the text they add (:func:`moelens.widgets.tokens.token_pieces`: no ``Ġ``/``Ċ`` markers; a
    newline shows as ``↵``). Hovering a token shows every MoE layer's experts and weights (if the
    trace has them). Tokens are laid out ``tokens_per_line`` per row. For clicking, aligned
    steered-vs-baseline views and cards, use :class:`moelens.widgets.RoutingExplorer`.
    """
    import numpy as np
    import plotly.graph_objects as go

    from moelens.widgets.tokens import token_pieces

    where = f"prompt_id = {literal(prompt_id)}"
    tokens = query(trace, f"SELECT position, token, token_id FROM tokens WHERE {where} ORDER BY position")
    if tokens.empty:
        raise ValueError(f"the trace has no tokens for prompt {prompt_id!r}")
    routes = query(
        trace,
        f"""
        SELECT position, layer, string_agg('e' || expert || coalesce(' ' || printf('%.3f', weight::DOUBLE), ''), ', ' ORDER BY rank) AS experts,
               arg_min(expert, rank) AS top_expert
        FROM routes WHERE {where} GROUP BY ALL ORDER BY position, layer
        """
    )
    hover = routes.groupby("position")[["layer", "experts"]].apply(
        lambda g: "<br>".join(f"L{layer}: {experts}" for layer, experts in zip(g["layer"], g["experts"]))
    )
    top = routes[routes["layer"] == layer].set_index("position")["top_expert"]
    if top.empty:
        raise ValueError(f"layer {layer} is not a MoE layer of this trace; its MoE layers are {trace.layers}")
    lines = -(-len(tokens) // tokens_per_line)
    cells = lines * tokens_per_line
    shape = (lines, tokens_per_line)

    def grid(values: Sequence[Any], fill: Any) -> np.ndarray:
        padded = np.full(cells, fill, dtype=object)
        padded[: len(values)] = list(values)
        return padded.reshape(shape)

    positions = tokens["position"].to_numpy()
    pieces = token_pieces(tokens["token_id"].tolist(), tokens["token"].tolist(), special_ids=trace.special_token_ids)
    # plotly renders tags (<b>) and decodes &lt; &gt; &amp; in text, but not &quot;: escape those three once
    labels = [html.escape(piece, quote=False).replace("\n", "↵") for piece in pieces]
    num_experts = trace.experts
    scale = []  # stepwise: z in [e, e + 1) gets expert e's colour
    for expert, color in enumerate(_categorical(num_experts)):
        scale += [[expert / num_experts, color], [(expert + 1) / num_experts, color]]
    z = grid([float(top.get(p, np.nan)) + 0.5 for p in positions], np.nan).astype(float)
    texts = [f"position {p} {label}<br>{hover.get(p, '')}" for p, label in zip(positions, labels)]
    figure = go.Figure(
        go.Heatmap(
            z=z,
            zmin=0,
            zmax=num_experts,
            text=grid(labels, ""),
            texttemplate="%{text}",
            textfont={"size": 13},
            hovertext=grid(texts, ""),
            hoverinfo="text",
            colorscale=scale,
            colorbar={"title": {"text": f"expert, layer {layer}"}, "tickvals": [e + 0.5 for e in range(num_experts)], "ticktext": [str(e) for e in range(num_experts)]},
            xgap=2,
            ygap=2,
            name=f"prompt {prompt_id}",
        )
    )
    figure.update_layout(
        template=template(),
        title=title or f"prompt {prompt_id}: first-choice expert per token at layer {layer}",
        yaxis={"autorange": "reversed", "showticklabels": False, "showgrid": False},
        xaxis={"showticklabels": False, "showgrid": False},
        height=120 + 40 * lines,
    )
    return figure


def write_html(figure: go.Figure, path: str | os.PathLike[str], *, plotlyjs: Literal["directory", "inline", "cdn"] = "directory") -> Path:
    """Write ``figure`` as an HTML file that opens without network.

    ``plotlyjs``: ``"directory"`` (default) writes plotly.js once as ``plotly.min.js`` beside the
    HTML files, which load it from there (a folder of figures costs one copy, ~4.8 MB, instead of
    one per file); ``"inline"`` embeds it in each file (one self-contained file); ``"cdn"``
    loads it from the plotly CDN (small files, needs network).
    """
    modes = {"directory": "directory", "inline": True, "cdn": "cdn"}
    if plotlyjs not in modes:
        raise ValueError(f"plotlyjs={plotlyjs!r}: use 'directory', 'inline' or 'cdn'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.write_html(path, include_plotlyjs=modes[plotlyjs], full_html=True)
    return path
