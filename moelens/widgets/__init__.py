"""Notebook widgets. ``import moelens.widgets`` is cheap: ipywidgets and torch load on first use.

::

    from moelens.widgets import ExpertGrid, RoutingExplorer, expert_card, card_html, linked_heatmap
    ExpertGrid(model, tokenizer)            # a layer x expert steering grid with streamed side-by-side generations
    RoutingExplorer(trace, steered_trace)   # a prompt's tokens coloured by expert, with the steered run aligned
    card_html(expert_card(trace, layer, expert, ftri=tables))   # an expert's load, contrasts and top contexts
    linked_heatmap(figure, on_select)       # a heatmap whose cell clicks call on_select(layer, expert)

Each view's logic lives in a pure-Python state object (:class:`ExpertGridState`,
:class:`RoutingExplorerState`, :class:`ExpertCard`), usable and tested without a notebook.
"""

from __future__ import annotations

from moelens._lazy import lazy_attributes
from typing import TYPE_CHECKING

_LAZY = {
    "ExpertGrid": "moelens.widgets.view",
    "ExpertGridState": "moelens.widgets.state",
    "CellScores": "moelens.widgets.state",
    "GridLayer": "moelens.widgets.state",
    "Options": "moelens.widgets.state",
    "PromptComparison": "moelens.widgets.state",
    "RoutingExplorer": "moelens.widgets.explorer_view",
    "RoutingExplorerState": "moelens.widgets.explorer",
    "ExpertCard": "moelens.widgets.cards",
    "expert_card": "moelens.widgets.cards",
    "card_html": "moelens.widgets.cards",
    "token_pieces": "moelens.widgets.tokens",
    "linked_heatmap": "moelens.widgets.links",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from moelens.widgets.state import CellScores, ExpertGridState, GridLayer, Options, PromptComparison
    from moelens.widgets.view import ExpertGrid
    from moelens.widgets.cards import ExpertCard, card_html, expert_card
    from moelens.widgets.explorer import RoutingExplorerState
    from moelens.widgets.explorer_view import RoutingExplorer
    from moelens.widgets.links import linked_heatmap
    from moelens.widgets.tokens import token_pieces


__getattr__, __dir__ = lazy_attributes('moelens.widgets', globals(), _LAZY)
