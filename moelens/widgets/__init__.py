"""Notebook widgets. ``import moelens.widgets`` is cheap: ipywidgets and torch load on first use.

::

    from moelens.widgets import ExpertGrid
    ExpertGrid(model, tokenizer)            # a layer x expert steering grid with side-by-side generations

The grid's logic lives in :class:`ExpertGridState` (pure Python, usable without a notebook).
"""

from __future__ import annotations

from moelens._lazy import lazy_attributes
from typing import TYPE_CHECKING

_LAZY = {
    "ExpertGrid": "moelens.widgets.view",
    "ExpertGridState": "moelens.widgets.state",
    "GridLayer": "moelens.widgets.state",
    "Options": "moelens.widgets.state",
    "PromptComparison": "moelens.widgets.state",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from moelens.widgets.state import ExpertGridState, GridLayer, Options, PromptComparison
    from moelens.widgets.view import ExpertGrid


__getattr__, __dir__ = lazy_attributes('moelens.widgets', globals(), _LAZY)
