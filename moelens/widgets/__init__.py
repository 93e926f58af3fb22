"""Notebook widgets. ``import moelens.widgets`` is cheap: ipywidgets and torch load on first use.

::

    from moelens.widgets import ExpertGrid
    ExpertGrid(model, tokenizer)            # a layer x expert steering grid with side-by-side generations

The grid's logic lives in :class:`ExpertGridState` (pure Python, usable without a notebook).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moelens.widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
