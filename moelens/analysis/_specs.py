"""What every analysis' spec helper shares.

Each analysis module has ``top_experts(result, n)`` ({layer: sorted expert ids}) and
``to_spec(result, n, *, kind=...)`` (an intervention on exactly those experts). ``kind`` names the
intervention in the README's words: ``"drop"`` (the expert stays chosen, its output is zeroed),
``"reroute"`` (its slot goes to the next choice), ``"keep"`` (routing restricted to the experts),
and ``"force"`` / ``"reweight"`` (the moelens.interventions constructors of those names).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from moelens.interventions import Intervention

# kinds an earlier release accepted, and what they are called now
_RENAMED_KINDS = {"switch_off": "drop"}


def check_count(n: int | None, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``n`` is a whole number >= 1 (or ``None`` when ``optional``)."""
    if n is None and optional:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number >= 1{' or None' if optional else ''}, got {n!r}")


def by_layer(rows: pd.DataFrame) -> dict[int, list[int]]:
    """The ``layer`` and ``expert`` columns of ``rows`` as {layer: sorted distinct experts}, layers ascending."""
    chosen: dict[int, set[int]] = {}
    for layer, expert in rows[["layer", "expert"]].itertuples(index=False):
        chosen.setdefault(int(layer), set()).add(int(expert))
    return {layer: sorted(chosen[layer]) for layer in sorted(chosen)}


def first_rows(table: pd.DataFrame, n: int) -> dict[int, list[int]]:
    """The first ``n`` rows of ``table`` over all layers (in the table's row order) as {layer: sorted experts}."""
    check_count(n)
    return by_layer(table.head(n))


def disable_builders(*, renormalize: bool = False) -> dict[str, Callable[..., Intervention]]:
    """The ``"drop"`` and ``"reroute"`` builders for :func:`build`: ``disable(experts, mode=Drop(renormalize=...))``
    and ``disable(experts, mode="reroute")``."""
    from moelens import interventions

    drop = interventions.Drop(renormalize=renormalize)
    return {
        "drop": lambda experts, **o: interventions.disable(experts, mode=drop, **o),
        "reroute": lambda experts, **o: interventions.disable(experts, mode="reroute", **o),
    }


def build(kind: str, builders: Mapping[str, Callable[..., Intervention]], experts: dict[int, list[int]], **options: Any) -> Intervention:
    """``builders[kind](experts, **options)``; a ``ValueError`` naming the kinds for any other ``kind``."""
    if kind not in builders:
        hint = f" ({kind!r} is now called {_RENAMED_KINDS[kind]!r})" if kind in _RENAMED_KINDS else ""
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}{hint}")
    return builders[kind](experts, **options)
