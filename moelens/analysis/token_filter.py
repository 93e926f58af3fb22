"""Which traced tokens an analysis counts: one filter shared by every analysis.

A trace holds every token the model processed: BOS, chat-template markers, the prompt, generated
tokens. Counting all of them mixes behaviours (answer length often tracks the behaviour class)
and template tokens into "specialization". :class:`TokenFilter` says which tokens count; every
analysis takes one (``tokens=``), applies it to both numerators and denominators, and records
:meth:`TokenFilter.describe` in its result's ``attrs["tokens"]``.

Special tokens are the tokenizer's ``all_special_ids``, recorded by ``moelens collect`` in the
store's manifest and by :func:`moelens.trace` when given a tokenizer. A trace that does not record
them cannot exclude them: the description then says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from moelens.store import Trace


@dataclass(frozen=True, kw_only=True)
class TokenFilter:
    """The tokens an analysis counts.

    Attributes:
        kind: ``"all"``, ``"prompt"`` (tokens the user gave) or ``"generated"`` (tokens the model produced).
        special: also count special tokens (BOS, EOS, chat-template markers); default False.
        positions: ``(start, stop)``: only positions start <= position < stop (stop None: to the end).
    """

    kind: Literal["all", "prompt", "generated"] = "all"
    special: bool = False
    positions: tuple[int, int | None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("all", "prompt", "generated"):
            raise ValueError(f"kind={self.kind!r}: use 'all', 'prompt' or 'generated'")
        if self.positions is not None:
            start, stop = self.positions
            if start < 0 or (stop is not None and stop <= start):
                raise ValueError(f"positions={self.positions}: use (start, stop) with 0 <= start < stop, or stop None")

    def predicate(self, tables: Trace, alias: str = "t") -> str | None:
        """A SQL condition over a ``tokens`` row named ``alias``, or ``None`` if every token counts."""
        conditions = []
        if self.kind != "all":
            conditions.append(f"{'' if self.kind == 'generated' else 'NOT '}{alias}.generated")
        specials = tables.special_token_ids
        if not self.special and specials:
            conditions.append(f"{alias}.token_id NOT IN ({', '.join(str(i) for i in specials)})")
        if self.positions is not None:
            start, stop = self.positions
            conditions.append(f"{alias}.position >= {int(start)}")
            if stop is not None:
                conditions.append(f"{alias}.position < {int(stop)}")
        return " AND ".join(conditions) or None

    def describe(self, tables: Trace) -> dict[str, object]:
        """What was counted, for a result's ``attrs["tokens"]``."""
        specials = tables.special_token_ids
        if self.special:
            special = "counted"
        elif specials:
            special = f"excluded (ids {specials})"
        else:
            special = "not excluded: the trace does not record which tokens are special (trace with a tokenizer)"
        return {"kind": self.kind, "special": special, "positions": self.positions}


PROMPT_TOKENS = TokenFilter(kind="prompt")  # MoTE's fTRI counts the prompt's tokens
ALL_TOKENS = TokenFilter()  # every token but the special ones


def filtered_tokens(tables: Trace, tokens: TokenFilter) -> str:
    """SQL: the ``tokens`` rows (``prompt_id, position``, and the rest) that ``tokens`` counts."""
    predicate = tokens.predicate(tables, "t")
    return f"SELECT * FROM tokens AS t{f' WHERE {predicate}' if predicate else ''}"


def filtered_routes(tables: Trace, tokens: TokenFilter) -> str:
    """SQL for a FROM clause: the ``routes`` rows whose token ``tokens`` counts (plain ``routes``
    when it counts every token)."""
    if tokens.predicate(tables) is None:
        return "routes"
    return f"routes AS r JOIN ({filtered_tokens(tables, tokens)}) AS t USING (prompt_id, position)"
