"""The routing explorer's state: one prompt of a trace, token by token, coloured by expert at a layer.

Pure Python (no ipywidgets): :class:`RoutingExplorerState` reads one prompt at a time from any
:class:`moelens.store.Trace` (an in-memory ``moelens.trace(...)`` or a store from
``moelens.read_trace(path)``) with SQL restricted to that prompt, so a large store is never loaded
whole. It answers what the view in :mod:`moelens.widgets.explorer_view` draws:

* the prompt's tokens as readable text (:mod:`moelens.widgets.tokens`);
* every token's experts, weights and (when the trace recorded router logits) router
  probabilities at every MoE layer (:meth:`RoutingExplorerState.decisions`, :meth:`~RoutingExplorerState.describe`);
* a categorical colour per expert at the selected layer (:meth:`~RoutingExplorerState.colors`);
* with a second trace of the same prompts (e.g. steered vs baseline), aligned on
  (prompt_id, position): every changed decision (:meth:`~RoutingExplorerState.changes`) and the
  fraction of positions whose expert set changed, per layer (:meth:`~RoutingExplorerState.layer_changes`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moelens.analysis.stats import literal
from moelens.widgets._observable import Observable
from moelens.widgets.tokens import token_pieces

if TYPE_CHECKING:
    from moelens.store import Trace

# A qualitative palette (distinct hues, no order implied), drawn translucent so that the theme's
# background shows through: pastel under dark text in a light theme, muted under light text in a dark one.
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79), (237, 201, 72),
    (176, 122, 161), (255, 157, 167), (156, 117, 95), (140, 209, 125), (102, 194, 255), (212, 166, 200),
)
PALETTE_ALPHA = 0.55
PALETTE: tuple[str, ...] = tuple(f"rgba({r}, {g}, {b}, {PALETTE_ALPHA})" for r, g, b in PALETTE_RGB)
OTHER_COLOR = "var(--jp-layout-color3, #bdbdbd)"  # experts beyond the palette share one neutral colour
_LISTED_IDS = 20  # prompt ids named in an error message


@dataclass(frozen=True)
class Choice:
    """One chosen expert of a token at a layer.

    ``weight`` is what the model multiplied the expert's output by (``None`` in stores without
    weights); ``probability`` is the softmax over the layer's router logits at this expert
    (whatever the family's own score function), ``None`` when the trace has no logits.
    """

    expert: int
    weight: float | None
    probability: float | None


@dataclass(frozen=True)
class Token:
    """One traced token: ``text`` is its readable piece (see :func:`moelens.widgets.tokens.token_pieces`)."""

    position: int
    token_id: int
    text: str
    generated: bool
    special: bool


@dataclass(frozen=True)
class Decision:
    """A token's routing at one MoE layer: ``choices`` in the trace (rank order; ``()`` if the
    trace has none there), ``other`` in the second trace (``None`` without a second trace or when
    it has no routing for this (position, layer))."""

    layer: int
    choices: tuple[Choice, ...]
    other: tuple[Choice, ...] | None

    @property
    def matched(self) -> bool:
        """Both traces routed this token at this layer."""
        return bool(self.choices) and bool(self.other)

    @property
    def changed(self) -> bool:
        """Both traces routed it and the expert *sets* differ (order and weights do not count)."""
        return self.matched and {c.expert for c in self.choices} != {c.expert for c in self.other or ()}


@dataclass(frozen=True)
class LayerChange:
    """Per MoE layer: ``matched`` positions routed in both traces, ``changed`` those whose expert set differs."""

    layer: int
    matched: int
    changed: int

    @property
    def fraction(self) -> float:
        """``changed / matched``; NaN when no position matched."""
        return self.changed / self.matched if self.matched else math.nan


@dataclass(frozen=True)
class AlignedToken:
    """A position of the prompt in both traces: either token may be missing (a longer generation)."""

    position: int
    token: Token | None
    other: Token | None
    changed_layers: tuple[int, ...]

    @property
    def differs(self) -> bool:
        """The traces hold different tokens here (the generations diverged), or only one holds one."""
        return self.token is None or self.other is None or self.token.token_id != self.other.token_id


@dataclass(frozen=True)
class _Prompt:
    """One trace's data for one prompt."""

    tokens: tuple[Token, ...]
    routing: Mapping[tuple[int, int], tuple[Choice, ...]]  # (position, layer) -> choices in rank order
    by_position: Mapping[int, Token]


class RoutingExplorerState(Observable):
    """Which prompt and MoE layer are shown, and everything the explorer draws for them.

    Args:
        trace: the trace to explore (``moelens.trace(...)`` or ``moelens.read_trace(path)``).
        other: a second trace of the same prompts (e.g. the steered run); positions are matched on
            (prompt_id, position). With it, only prompts present in both can be selected.
        tokenizer: decodes the token texts (else the vocabulary strings are mapped, see
            :mod:`moelens.widgets.tokens`).
        prompt_id, layer: the initial selection (default: the first prompt and first MoE layer).
        names: what the two traces are called in descriptions.
    """

    def __init__(
        self,
        trace: Trace,
        other: Trace | None = None,
        *,
        tokenizer: Any = None,
        prompt_id: Any = None,
        layer: int | None = None,
        names: tuple[str, str] = ("baseline", "steered"),
    ) -> None:
        self.trace, self.other, self.tokenizer, self.names = trace, other, tokenizer, names
        self.layers: list[int] = [int(layer) for layer in trace.layers]
        if not self.layers:
            raise ValueError("the trace has no MoE layers to explore")
        ids = _prompt_ids(trace)
        if other is not None:
            in_other = set(_prompt_ids(other))
            ids = [i for i in ids if i in in_other]
        if not ids:
            where = "the two traces have no prompt in common" if other is not None else "the trace has no tokens"
            raise ValueError(f"nothing to explore: {where}")
        self.prompt_ids: list[Any] = ids
        self._cache: dict[tuple[int, Any], _Prompt] = {}
        Observable.__init__(self)
        self._prompt_id = self._checked_prompt(ids[0] if prompt_id is None else prompt_id)
        self._layer = self._checked_layer(self.layers[0] if layer is None else layer)

    # --- selection ------------------------------------------------------------------------------
    @property
    def prompt_id(self) -> Any:
        """The prompt shown."""
        return self._prompt_id

    @property
    def layer(self) -> int:
        """The MoE layer whose first choices colour the tokens."""
        return self._layer

    def select(self, *, prompt_id: Any = None, layer: int | None = None) -> None:
        """Show another prompt and/or layer (``None`` keeps the current one); both are checked first.
        A prompt id may also be given as its string (``"3"`` for 3), as text boxes return it."""
        new_prompt = self._prompt_id if prompt_id is None else self._checked_prompt(prompt_id)
        new_layer = self._layer if layer is None else self._checked_layer(layer)
        if (new_prompt, new_layer) != (self._prompt_id, self._layer):
            self._prompt_id, self._layer = new_prompt, new_layer
            self._notify()

    def _checked_prompt(self, prompt_id: Any) -> Any:
        for known in self.prompt_ids:
            if known == prompt_id or str(known) == str(prompt_id):
                return known
        listed = ", ".join(repr(i) for i in self.prompt_ids[:_LISTED_IDS])
        more = f" and {len(self.prompt_ids) - _LISTED_IDS} more" if len(self.prompt_ids) > _LISTED_IDS else ""
        where = "in both traces" if self.other is not None else "in the trace"
        raise ValueError(f"prompt {prompt_id!r} is not {where}; prompt ids {where}: {listed}{more}")

    def _checked_layer(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer of the trace; MoE layers are {self.layers}")
        return int(layer)

    # --- the prompt's data ----------------------------------------------------------------------
    def _prompt(self, which: int) -> _Prompt:
        key = (which, self._prompt_id)
        if key not in self._cache:
            trace = self.trace if which == 0 else self.other
            assert trace is not None
            self._cache[key] = _load_prompt(trace, self._prompt_id, self.tokenizer)
        return self._cache[key]

    @property
    def tokens(self) -> tuple[Token, ...]:
        """The selected prompt's tokens in the trace, in position order."""
        return self._prompt(0).tokens

    @property
    def other_tokens(self) -> tuple[Token, ...] | None:
        """The selected prompt's tokens in the second trace (``None`` without one)."""
        return self._prompt(1).tokens if self.other is not None else None

    def decision(self, position: int, layer: int | None = None) -> Decision:
        """The routing of the token at ``position`` at ``layer`` (default: the selected layer)."""
        layer = self._layer if layer is None else self._checked_layer(layer)
        other = self._prompt(1).routing.get((position, layer)) if self.other is not None else None
        return Decision(layer, self._prompt(0).routing.get((position, layer), ()), other)

    def decisions(self, position: int) -> list[Decision]:
        """The token's routing at every MoE layer, in layer order."""
        return [self.decision(position, layer) for layer in self.layers]

    def top_expert(self, position: int, *, other: bool = False) -> int | None:
        """The rank-0 expert of the token at the selected layer (in the second trace with ``other``), or ``None``."""
        prompt = self._prompt(1 if other else 0)
        choices = prompt.routing.get((position, self._layer), ())
        return choices[0].expert if choices else None

    def colors(self) -> dict[int, str]:
        """{expert: CSS colour} for the rank-0 experts at the selected layer in the shown prompt.

        Experts are ordered by how many of the prompt's tokens (both traces together) chose them
        first, most first (ties: lower id first); the first ``len(PALETTE)`` get the palette's
        colours in that order, the rest :data:`OTHER_COLOR`. Both traces share the assignment,
        so an expert has one colour on both sides of a comparison.
        """
        counts: Counter[int] = Counter()
        for which in (0, 1) if self.other is not None else (0,):
            for token in self._prompt(which).tokens:
                expert = self.top_expert(token.position, other=which == 1)
                if expert is not None:
                    counts[expert] += 1
        ordered = sorted(counts, key=lambda expert: (-counts[expert], expert))
        return {expert: PALETTE[i] if i < len(PALETTE) else OTHER_COLOR for i, expert in enumerate(ordered)}

    # --- comparison -----------------------------------------------------------------------------
    def changes(self) -> set[tuple[int, int]]:
        """Every (position, layer) of the selected prompt whose expert set differs between the two
        traces (positions routed in only one of them are not changes; see :class:`Decision`)."""
        return {(position, layer) for (position, layer), decision in self._compared().items() if decision.changed}

    def layer_changes(self) -> list[LayerChange]:
        """Per MoE layer, in order: positions routed in both traces and how many changed their expert set."""
        matched: Counter[int] = Counter()
        changed: Counter[int] = Counter()
        for (_, layer), decision in self._compared().items():
            matched[layer] += decision.matched
            changed[layer] += decision.changed
        return [LayerChange(layer, matched[layer], changed[layer]) for layer in self.layers]

    def aligned(self) -> list[AlignedToken]:
        """Every position of the selected prompt in either trace, in order, with the layers whose
        decision changed there."""
        if self.other is None:
            raise ValueError("aligning needs a second trace: RoutingExplorerState(trace, other)")
        mine, theirs = self._prompt(0).by_position, self._prompt(1).by_position
        changes = self.changes()
        return [
            AlignedToken(position, mine.get(position), theirs.get(position), tuple(layer for layer in self.layers if (position, layer) in changes))
            for position in sorted(mine.keys() | theirs.keys())
        ]

    def _compared(self) -> dict[tuple[int, int], Decision]:
        if self.other is None:
            raise ValueError("comparing needs a second trace: RoutingExplorerState(trace, other)")
        cells = self._prompt(0).routing.keys() | self._prompt(1).routing.keys()
        return {(position, layer): self.decision(position, layer) for position, layer in cells}

    # --- text -----------------------------------------------------------------------------------
    def describe(self, position: int) -> str:
        """Plain text: the token and its routing at every MoE layer, one line per layer, e.g.
        ``L2: e5 w0.62 p0.41, e3 w0.38 p0.22 | steered: e5 w0.70, e9 w0.30  (changed)``."""
        token = self._prompt(0).by_position.get(position)
        other = self._prompt(1).by_position.get(position) if self.other is not None else None
        shown = token or other
        if shown is None:
            raise ValueError(f"prompt {self._prompt_id!r} has no token at position {position}")
        head = f"position {position}: {shown.text!r} (id {shown.token_id}{', generated' if shown.generated else ''})"
        if token is not None and other is not None and other.token_id != token.token_id:
            head += f"; {self.names[1]}: {other.text!r} (id {other.token_id})"
        lines = [head]
        for decision in self.decisions(position):
            line = f"L{decision.layer}: {_choices_text(decision.choices)}"
            if self.other is not None:
                line += f" | {self.names[1]}: {_choices_text(decision.other or ())}" + ("  (changed)" if decision.changed else "")
            lines.append(line)
        return "\n".join(lines)


def _choices_text(choices: Sequence[Choice]) -> str:
    if not choices:
        return "-"
    parts = []
    for choice in choices:
        part = f"e{choice.expert}"
        if choice.weight is not None:
            part += f" w{choice.weight:.2f}"
        if choice.probability is not None:
            part += f" p{choice.probability:.2f}"
        parts.append(part)
    return ", ".join(parts)


def _prompt_ids(trace: Trace) -> list[Any]:
    return trace.sql("SELECT DISTINCT prompt_id FROM tokens ORDER BY prompt_id")["prompt_id"].tolist()


def _load_prompt(trace: Trace, prompt_id: Any, tokenizer: Any) -> _Prompt:
    """The prompt's tokens and routing (with router probabilities when the trace has logits)."""
    import numpy as np

    where = f"prompt_id = {literal(prompt_id)}"
    tokens = trace.sql(f"SELECT position, token_id, token, generated FROM tokens WHERE {where} ORDER BY position")
    routes = trace.sql(f"SELECT position, layer, expert, weight::DOUBLE AS weight FROM routes WHERE {where} ORDER BY position, layer, rank")
    probabilities: dict[tuple[int, int], np.ndarray] = {}
    if "logits" in trace.table_names():
        logits = trace.sql(f"SELECT position, layer, logits FROM logits WHERE {where}")
        for position, layer, row in zip(logits["position"].tolist(), logits["layer"].tolist(), logits["logits"]):
            values = np.asarray(row, dtype=np.float64)
            exponent = np.exp(values - values.max())
            probabilities[(position, layer)] = exponent / exponent.sum()
    special = set(tokenizer.all_special_ids) if tokenizer is not None else set(trace.special_token_ids)
    ids = tokens["token_id"].tolist()
    strings = tokens["token"].astype(object).where(tokens["token"].notna(), None).tolist()
    pieces = token_pieces(ids, strings, tokenizer=tokenizer, special_ids=special)
    token_rows = tuple(
        Token(int(position), int(token_id), piece, bool(generated), int(token_id) in special)
        for position, token_id, piece, generated in zip(tokens["position"].tolist(), ids, pieces, tokens["generated"].tolist())
    )
    routing: dict[tuple[int, int], list[Choice]] = {}
    for position, layer, expert, weight in zip(routes["position"].tolist(), routes["layer"].tolist(), routes["expert"].tolist(), routes["weight"].tolist()):
        probs = probabilities.get((position, layer))
        probability = float(probs[expert]) if probs is not None and expert < len(probs) else None
        routing.setdefault((int(position), int(layer)), []).append(
            Choice(int(expert), None if math.isnan(weight) else float(weight), probability)
        )
    return _Prompt(token_rows, {key: tuple(choices) for key, choices in routing.items()}, {token.position: token for token in token_rows})
