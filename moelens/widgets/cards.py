"""Expert cards: what one (layer, expert) does, on one page.

:func:`expert_card` computes an :class:`ExpertCard` (pure data) from a trace and, optionally,
fTRI and nPMI tables; :func:`card_html` renders it as HTML for a notebook (JupyterLab's theme
variables, so it reads in light and dark themes), e.g. as the steering grid's ``card``::

    card = lambda layer, expert: card_html(expert_card(trace, layer, expert, ftri={"code": table}))
    ExpertGrid(model, tokenizer, card=card)
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moelens.analysis.stats import literal, query, with_groups
from moelens.analysis.token_filter import ALL_TOKENS, TokenFilter
from moelens.widgets.tokens import token_pieces

if TYPE_CHECKING:
    import pandas as pd

    from moelens.store import Trace


@dataclass(frozen=True)
class Contrast:
    """The expert's row of one fTRI table (:func:`moelens.analysis.ftri_scores`), labelled by its
    target; ``place`` is the row's ``place`` in its table (1 = most target-specific)."""

    label: str
    place: int
    difference: float
    target_rate: float
    reference_rate: float
    q_value: float  # NaN when the table was computed without the permutation test


@dataclass(frozen=True)
class Marker:
    """The expert's row of one nPMI table (:func:`moelens.analysis.npmi_scores`), labelled by its condition.

    ``npmi`` is the table's ``npmi`` column (or ``score`` for :func:`~moelens.analysis.npmi_combined`);
    ``place`` is the row's ``place`` in its table (1 = first); the interval and ``joint_tokens`` (the
    counted tokens that satisfy the condition and chose the expert) are ``None`` where the table has
    no such columns.
    """

    label: str
    place: int
    npmi: float
    npmi_low: float | None
    npmi_high: float | None
    joint_tokens: int | None


@dataclass(frozen=True)
class Context:
    """A token that chose the expert, with ``window`` tokens of its prompt on each side (fewer at
    the prompt's ends), as readable text pieces; ``token`` is the chosen token's piece, ``rank`` the
    expert's place in the token's routing (``routes.rank``: 0 = the router's first choice)."""

    prompt_id: Any
    position: int
    rank: int
    weight: float | None
    before: tuple[str, ...]
    token: str
    after: tuple[str, ...]


@dataclass(frozen=True)
class ExpertCard:
    """One (layer, expert): its load, fTRI contrasts, nPMI markers and top-activating contexts.

    Load, over the tokens the card's :class:`~moelens.analysis.TokenFilter` counts (``counted``,
    its description), at ``layer`` only:

    * ``slots``: routing slots filled at the layer (routes rows: k per token, fewer where an
      intervention left slots empty); ``tokens``: tokens routed at the layer;
    * ``selections``: tokens that chose the expert (at any rank);
    * :attr:`share` = selections / slots (the expert's share of the layer's routing, summing to 1
      over the layer's experts); :attr:`frequency` = selections / tokens (the fraction of tokens
      that chose it, in [0, 1]);
    * ``mean_weight``: the mean routing weight over its selections (``None`` if never chosen or
      the trace has no weights).
    """

    layer: int
    expert: int
    selections: int
    slots: int
    tokens: int
    mean_weight: float | None
    contrasts: tuple[Contrast, ...]
    markers: tuple[Marker, ...]
    contexts: tuple[Context, ...]
    counted: Mapping[str, object]

    @property
    def share(self) -> float:
        """selections / slots; NaN when the layer routed no counted token."""
        return self.selections / self.slots if self.slots else math.nan

    @property
    def frequency(self) -> float:
        """selections / tokens; NaN when the layer routed no counted token."""
        return self.selections / self.tokens if self.tokens else math.nan


def expert_card(
    trace: Trace,
    layer: int,
    expert: int,
    *,
    ftri: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    npmi: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    top: int = 5,
    contexts: int = 5,
    window: int = 8,
    tokens: TokenFilter = ALL_TOKENS,
    tokenizer: Any = None,
) -> ExpertCard:
    """The card of ``expert`` at MoE ``layer`` of ``trace`` (see :class:`ExpertCard` for the load).

    Args:
        ftri: an :func:`~moelens.analysis.ftri_scores` table, or {target label: table} for several
            contrasts; the expert's rows, highest ``difference`` first, the first ``top`` kept.
        npmi: an :func:`~moelens.analysis.npmi_scores` (or ``npmi_combined``) table, or {condition
            label: table}; the expert's rows, highest nPMI first, the first ``top`` kept (a table
            without the expert, dropped by its ``min_count``, adds nothing).
        contexts: how many top-activating tokens: the routes rows of (layer, expert) among the
            counted tokens, highest weight first; ties, and stores without weights, by rank, then
            (prompt_id, position).
        window: tokens shown on each side of a context's token (every token of the prompt, counted or not).
        tokens: which tokens count for the load and the contexts (default: all but special tokens).
        tokenizer: decodes the contexts' text (else the vocabulary strings are mapped, see
            :mod:`moelens.widgets.tokens`).
    """
    layers = [int(i) for i in trace.layers]
    if layer not in layers:
        raise ValueError(f"layer {layer} is not an MoE layer of the trace; MoE layers are {layers}")
    if not 0 <= expert < trace.experts:
        raise ValueError(f"expert {expert} is out of range: the trace's layers have experts 0-{trace.experts - 1}")
    for name, count in (("top", top), ("contexts", contexts), ("window", window)):
        if count < 0:
            raise ValueError(f"{name}={count}: give a count >= 0")
    source = f"SELECT * FROM ({with_groups(trace, (), tokens)}) WHERE layer = {int(layer)}"
    load = query(
        trace,
        f"""
        SELECT count(*) AS slots, count(DISTINCT (prompt_id, position)) AS tokens,
               count(DISTINCT (prompt_id, position)) FILTER (WHERE expert = {int(expert)}) AS selections,
               avg(weight::DOUBLE) FILTER (WHERE expert = {int(expert)}) AS mean_weight
        FROM ({source})
        """,
    ).iloc[0]
    top_rows = query(
        trace,
        f"""
        SELECT prompt_id, position::BIGINT AS position, rank::BIGINT AS rank, weight::DOUBLE AS weight FROM ({source}) WHERE expert = {int(expert)}
        ORDER BY weight DESC NULLS LAST, rank, prompt_id, position LIMIT {int(contexts)}
        """,
    )
    mean_weight = float(load["mean_weight"])
    return ExpertCard(
        layer=int(layer),
        expert=int(expert),
        selections=int(load["selections"]),
        slots=int(load["slots"]),
        tokens=int(load["tokens"]),
        mean_weight=None if math.isnan(mean_weight) else mean_weight,
        contrasts=_contrasts(ftri, layer, expert, top),
        markers=_markers(npmi, layer, expert, top),
        contexts=_contexts(trace, top_rows, window, tokenizer),
        counted=tokens.describe(trace),
    )


def _labelled(tables: pd.DataFrame | Mapping[str, pd.DataFrame] | None, default: str) -> dict[str, pd.DataFrame]:
    if tables is None:
        return {}
    return dict(tables) if isinstance(tables, Mapping) else {default: tables}


def _expert_rows(tables: dict[str, pd.DataFrame], kind: str, required: set[str], layer: int, expert: int) -> list[tuple[str, Any]]:
    """(label, row) for every table's rows of (layer, expert); a table lacking columns is refused by name."""
    rows = []
    for label, table in tables.items():
        missing = required - set(table.columns)
        if missing:
            raise ValueError(f"the {kind} table {label!r} lacks the columns {sorted(missing)}; it has {list(table.columns)}")
        chosen = table[(table["layer"] == layer) & (table["expert"] == expert)]
        rows.extend((label, row) for row in chosen.itertuples(index=False))
    return rows


def _contrasts(tables: pd.DataFrame | Mapping[str, pd.DataFrame] | None, layer: int, expert: int, top: int) -> tuple[Contrast, ...]:
    columns = {"place", "layer", "expert", "difference", "target_rate", "reference_rate", "q_value"}
    found = [
        Contrast(label, int(row.place), float(row.difference), float(row.target_rate), float(row.reference_rate), float(row.q_value))
        for label, row in _expert_rows(_labelled(tables, "fTRI"), "fTRI", columns, layer, expert)
    ]
    return tuple(sorted(found, key=lambda c: (-c.difference, c.label))[:top])


def _markers(tables: pd.DataFrame | Mapping[str, pd.DataFrame] | None, layer: int, expert: int, top: int) -> tuple[Marker, ...]:
    found = []
    for label, table in _labelled(tables, "nPMI").items():
        value = "npmi" if "npmi" in table.columns else "score"
        for _, row in _expert_rows({label: table}, "nPMI", {"place", "layer", "expert", value}, layer, expert):
            row = row._asdict()
            optional = {name: row.get(name) for name in ("npmi_low", "npmi_high", "joint_tokens")}
            found.append(
                Marker(
                    label, int(row["place"]), float(row[value]),
                    *(None if optional[name] is None else float(optional[name]) for name in ("npmi_low", "npmi_high")),
                    None if optional["joint_tokens"] is None else int(optional["joint_tokens"]),
                )
            )
    return tuple(sorted(found, key=lambda m: (-m.npmi, m.label))[:top])


def _contexts(trace: Trace, rows: pd.DataFrame, window: int, tokenizer: Any) -> tuple[Context, ...]:
    """Each top row's window of tokens, decoded to text pieces."""
    if rows.empty:
        return ()
    spans = " OR ".join(
        f"(prompt_id = {literal(prompt_id)} AND position BETWEEN {max(int(position) - window, 0)} AND {int(position) + window})"
        for prompt_id, position in zip(rows["prompt_id"].tolist(), rows["position"].tolist())
    )
    around = query(trace, f"SELECT prompt_id, position::BIGINT AS position, token_id, token FROM tokens WHERE {spans} ORDER BY prompt_id, position")
    around["token"] = around["token"].astype(object).where(around["token"].notna(), None)
    special = set(trace.special_token_ids)
    found = []
    for prompt_id, position, rank, weight in zip(rows["prompt_id"].tolist(), rows["position"].tolist(), rows["rank"].tolist(), rows["weight"].tolist()):
        near = around[(around["prompt_id"] == prompt_id) & (around["position"] - position).abs().le(window)]
        pieces = token_pieces(near["token_id"].tolist(), near["token"].tolist(), tokenizer=tokenizer, special_ids=special)
        at = near["position"].tolist().index(position)
        found.append(
            Context(prompt_id, int(position), int(rank), None if math.isnan(weight) else float(weight), tuple(pieces[:at]), pieces[at], tuple(pieces[at + 1 :]))
        )
    return tuple(found)


# --- HTML -------------------------------------------------------------------------------------------
_CARD_STYLE = (
    "color:var(--jp-content-font-color1, #212121);background:var(--jp-layout-color1, white);"
    "border:1px solid var(--jp-border-color1, #bdbdbd);border-radius:4px;padding:8px 12px;font-size:13px;max-width:900px"
)
_CELL = "style='padding:2px 8px;text-align:left;border-bottom:1px solid var(--jp-border-color2, #e0e0e0)'"
_CONTEXT_STYLE = "white-space:pre-wrap;font-family:var(--jp-code-font-family, monospace);font-size:13px;margin:2px 0"
# translucent amber over the theme's background, outlined in the theme's warning colour
_CHOSEN_STYLE = "background:rgba(255, 179, 0, 0.45);outline:1px solid var(--jp-warn-color0, #e65100);border-radius:2px"


def _number(value: float | None, form: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, form)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th {_CELL}>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td {_CELL}>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table style='border-collapse:collapse;color:inherit'><tr>{head}</tr>{body}</table>"


def _counted_text(counted: Mapping[str, object]) -> str:
    """A :meth:`TokenFilter.describe` record in words, e.g. ``prompt tokens; special tokens excluded (ids [0, 1])``."""
    kinds = {"all": "prompt and generated tokens", "prompt": "prompt tokens", "generated": "generated tokens"}
    parts = [kinds.get(str(counted.get("kind")), str(counted.get("kind"))), f"special tokens {counted.get('special')}"]
    if counted.get("positions") is not None:
        start, stop = counted["positions"]  # type: ignore[misc]
        parts.append(f"positions {start} to {'the end' if stop is None else stop - 1}")
    return "; ".join(parts)


def card_html(card: ExpertCard) -> str:
    """The card as an HTML fragment (class ``moelens-card``); every text from the trace or a table
    is HTML-escaped exactly once, and the chosen token of each context is marked (``moelens-chosen``)."""
    e = html.escape
    parts = [
        f"<div class='moelens-card' style='{_CARD_STYLE}'>",
        f"<div style='font-size:15px;font-weight:bold;margin-bottom:4px'>Layer {card.layer}, expert {card.expert}</div>",
        f"<div class='moelens-card-load'>load: {_number(card.share, '.1%')} of the routing slots at layer {card.layer} "
        f"({card.selections} of {card.slots}); chosen by {card.selections} of {card.tokens} tokens ({_number(card.frequency, '.1%')})"
        f"; mean weight {_number(card.mean_weight, '.3f')}</div>",
        f"<div style='opacity:0.75;font-size:12px'>tokens counted: {e(_counted_text(card.counted))}</div>",
    ]
    if card.contrasts:
        rows = [
            [e(c.label), str(c.place), _number(c.difference, '+.3f'), _number(c.target_rate, '.3f'), _number(c.reference_rate, '.3f'), _number(c.q_value, '.3g')]
            for c in card.contrasts
        ]
        parts += ["<div style='margin-top:8px;font-weight:bold'>fTRI contrasts</div>",
                  _table(["target", "place", "difference", "target rate", "reference rate", "q"], rows)]
    if card.markers:
        rows = [
            [e(m.label), str(m.place), _number(m.npmi, '+.3f'), f"[{_number(m.npmi_low, '+.2f')}, {_number(m.npmi_high, '+.2f')}]",
             "-" if m.joint_tokens is None else str(m.joint_tokens)]
            for m in card.markers
        ]
        parts += ["<div style='margin-top:8px;font-weight:bold'>nPMI markers</div>", _table(["condition", "place", "nPMI", "95% interval", "joint tokens"], rows)]
    parts.append(f"<div style='margin-top:8px;font-weight:bold'>top {len(card.contexts)} contexts by weight</div>")
    if not card.contexts:
        parts.append("<div>the expert was never chosen by a counted token at this layer</div>")
    rows = []
    for context in card.contexts:
        label = f"prompt {e(str(context.prompt_id))}, position {context.position}<br>rank {context.rank}, weight {_number(context.weight, '.3f')}"
        text = (
            f"{e(''.join(context.before))}<span class='moelens-chosen' style='{_CHOSEN_STYLE}'>{e(context.token)}</span>{e(''.join(context.after))}"
        )
        rows.append(f"<div style='opacity:0.7;font-size:12px'>{label}</div><div class='moelens-context' style='{_CONTEXT_STYLE}'>{text}</div>")
    parts += [f"<div style='display:grid;grid-template-columns:max-content 1fr;gap:6px 12px;align-items:start'>{''.join(rows)}</div>", "</div>"]
    return "".join(parts)
