"""Descriptive routing statistics over any trace (a store on disk or an in-memory tracer).

Every function takes a :class:`moelens.store.Trace` (either kind) and aggregates in DuckDB over its
``routes`` / ``tokens`` / ``prompts`` views, so a store never has to fit in memory; the results are
small tidy pandas DataFrames.

Grouping: every statistic accepts ``by``, a sequence of keys, each either a column of the
``prompts`` table (a tag such as ``"domain"``) or :data:`POSITION_CLASS`, which classifies each
token as ``"first"`` (position 0), ``"generated"`` (produced by the model) or ``"prompt"`` (the
rest). The key columns come first in every result, in the order given.

Tokens: every statistic takes ``tokens``, a :class:`~moelens.analysis.token_filter.TokenFilter`
(default: every token except the special ones), applied before anything is counted.

Entropies are in bits.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

from moelens.analysis.token_filter import ALL_TOKENS, TokenFilter

if TYPE_CHECKING:
    import duckdb
    import pandas as pd
    import pyarrow as pa

    from moelens.store import Trace

POSITION_CLASS = "position_class"


# --- shared SQL helpers (also used by ftri and npmi) ----------------------------------------------
def quote(name: str) -> str:
    """``name`` as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: object) -> str:
    """``value`` as a DuckDB literal (numbers stay numbers, everything else becomes a string)."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, numbers.Real):  # numpy scalars from a DataFrame included
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def table_columns(tables: Trace, table: str) -> list[str]:
    """Column names of one of the trace's views (empty if the trace has no such table)."""
    rows = connection(tables).execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position", [table]
    ).fetchall()
    return [row[0] for row in rows]


def check_tags(tables: Trace, tags: Sequence[str], role: str = "by") -> None:
    """Raise ``ValueError`` unless every name in ``tags`` is a column of the ``prompts`` table.

    ``role`` is the argument the names came from, for the message: ``"by"`` (grouping columns),
    ``"tag"`` (the column a contrast compares) or ``"where"`` (a condition on prompt tags).
    """
    if not tags:
        return
    available = [c for c in table_columns(tables, "prompts") if c not in ("prompt_id", "text")]
    missing = [t for t in tags if t not in available]
    if missing:
        where = f"its prompt tags are {available}" if available else "it has no prompt tags (no `prompts` table or no tag columns)"
        if role == "by":
            raise ValueError(f"cannot group by {missing}: {where}; {POSITION_CLASS!r} is also accepted")
        raise ValueError(f"{role}: no prompt tag {', '.join(map(repr, missing))}: {where}")


def with_groups(tables: Trace, by: Sequence[str], tokens: TokenFilter, source: str = "routes") -> str:
    """SQL for the rows of ``source`` (a relation with ``prompt_id`` and ``position``) whose token
    ``tokens`` counts, with one more column per key of ``by``.

    The single place that turns grouping keys and the token filter into joins: tags come from
    ``prompts``, the position class and the filter from ``tokens``. Without keys and with a filter
    that keeps every token, ``source`` is returned unjoined (no cost).
    """
    by = list(by)
    tags = [key for key in by if key != POSITION_CLASS]
    check_tags(tables, tags)
    predicate = tokens.predicate(tables, "t")
    if not by and predicate is None:
        return f"SELECT * FROM {source}"
    columns, joins = ["s.*"], []
    if tags:
        joins.append("LEFT JOIN prompts AS p ON p.prompt_id = s.prompt_id")
    if POSITION_CLASS in by or predicate is not None:
        kind = "JOIN" if predicate is not None else "LEFT JOIN"
        joins.append(f"{kind} tokens AS t ON t.prompt_id = s.prompt_id AND t.position = s.position{f' AND {predicate}' if predicate else ''}")
    for key in by:
        if key == POSITION_CLASS:
            columns.append(
                "CASE WHEN s.position = 0 THEN 'first' WHEN t.generated THEN 'generated' ELSE 'prompt' END AS position_class"
            )
        else:
            columns.append(f"p.{quote(key)} AS {quote(key)}")
    return f"SELECT {', '.join(columns)} FROM {source} AS s {' '.join(joins)}"


def key_list(by: Sequence[str], prefix: str = "") -> str:
    """``by`` as a SQL column list ending in a comma (empty without keys), e.g. for SELECT and GROUP BY."""
    return "".join(f"{prefix}{quote(key)}, " for key in by)


def connection(tables: Trace) -> duckdb.DuckDBPyConnection:
    """The trace's DuckDB connection, tuned for (layer, expert) aggregations.

    DuckDB aggregates with a direct-indexed ("perfect") hash table only when the group keys' types
    span at most ``perfect_ht_threshold`` bits (default 12); two uint8 keys plus their null bits need
    18, and the direct table roughly doubles the speed of every GROUP BY layer, expert.
    """
    handle = tables.duckdb()
    handle.execute("SET perfect_ht_threshold = 20")
    return handle


def query(tables: Trace, sql: str, counted: TokenFilter | None = None) -> pd.DataFrame:
    """Run ``sql`` over the trace's views on the tuned connection; the result as a DataFrame
    (with ``attrs["tokens"]``, what was counted, when ``counted`` is given)."""
    return with_counted(connection(tables).sql(sql).df(), tables, counted)


def with_counted(frame: pd.DataFrame, tables: Trace, counted: TokenFilter | None) -> pd.DataFrame:
    """``frame`` with ``attrs["tokens"]`` saying which tokens were counted."""
    if counted is not None:
        frame.attrs["tokens"] = counted.describe(tables)
    return frame


def one_row(tables: Trace, sql: str, parameters: Sequence[object] = ()) -> tuple:
    """The single result row of ``sql`` (fetched in full: DuckDB keeps a half-read result open)."""
    return connection(tables).execute(sql, list(parameters)).fetchall()[0]


# --- per (layer, expert) -------------------------------------------------------------------------
def expert_frequency(tables: Trace, by: Sequence[str] = (), *, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """Selection frequency and mean weight of every (layer, expert), never-selected experts included.

    Columns: ``*by, layer, expert, selections, tokens, frequency, share, mean_weight`` where
    ``selections`` counts the routing events that chose the expert (token x slot, any rank; a token
    chooses an expert at most once per layer, so this is also the tokens that chose it), ``tokens``
    the tokens routed at that layer in the group, ``frequency = selections / tokens`` (in [0, 1]), ``share`` the
    expert's fraction of all selections at that layer (sums to 1 per layer and group) and
    ``mean_weight`` the mean routing weight over its selections (NaN if never selected, and on a
    store without weights, see :func:`moelens.store.require_weights`).
    """
    import pandas as pd

    by = list(by)
    keys = key_list(by)
    # rank-0 rows count the routed tokens; their per-layer sum is taken in pandas, as a window
    # function over the aggregate would slow DuckDB's plan down
    counts = query(
        tables,
        f"""
        SELECT {keys} layer, expert, count(*) AS selections, avg(weight::DOUBLE) AS mean_weight,
               count(*) FILTER (WHERE rank = 0) AS routed_tokens
        FROM ({with_groups(tables, by, tokens)}) GROUP BY ALL
        """,
    )
    layers, num_experts = tables.layers, tables.experts
    groups = counts[by].drop_duplicates() if by else pd.DataFrame(index=[0])
    grid = groups.merge(pd.DataFrame({"layer": layers}), how="cross").merge(pd.DataFrame({"expert": range(num_experts)}), how="cross")
    counts = counts.astype({"layer": "int64", "expert": "int64"})
    frame = grid.merge(counts, on=[*by, "layer", "expert"], how="left")
    frame["selections"] = frame["selections"].fillna(0).astype("int64")
    frame["tokens"] = frame.groupby([*by, "layer"], dropna=False)["routed_tokens"].transform("sum").fillna(0).astype("int64")
    frame["frequency"] = frame["selections"] / frame["tokens"].where(frame["tokens"] > 0)
    layer_total = frame.groupby([*by, "layer"], dropna=False)["selections"].transform("sum")
    frame["share"] = frame["selections"] / layer_total.where(layer_total > 0)
    columns = [*by, "layer", "expert", "selections", "tokens", "frequency", "share", "mean_weight"]
    return with_counted(frame[columns].sort_values([*by, "layer", "expert"]).reset_index(drop=True), tables, tokens)


def load_balance(tables: Trace, by: Sequence[str] = (), *, frequency: pd.DataFrame | None = None, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """Load-balance measures per layer over the expert loads (selection counts, zeros included).

    Columns: ``*by, layer, experts, selections, cv, gini, max_over_mean, entropy, normalized_entropy``:
    ``experts`` the number of experts of the layer, ``selections`` the layer's routing events (token x
    slot, the sum of the loads), ``cv`` = population standard deviation / mean of the loads, ``gini`` = sum_ij |x_i - x_j| /
    (2 n^2 mean) (0: perfectly balanced, (n-1)/n: one expert takes everything), ``max_over_mean`` the
    busiest expert's load over the mean, ``entropy`` the entropy (bits) of the load distribution
    (the per-layer routing entropy) and ``normalized_entropy`` = entropy / log2(experts).
    Pass ``frequency`` (an :func:`expert_frequency` result with the same ``by``) to skip re-reading.
    """
    import numpy as np
    import pandas as pd

    by = list(by)
    frequency = expert_frequency(tables, by, tokens=tokens) if frequency is None else frequency
    rows = []
    for key, group in frequency.groupby([*by, "layer"], sort=True, dropna=False):
        loads = group["selections"].to_numpy(dtype=np.float64)
        n, mean = loads.size, loads.mean()
        shares = loads[loads > 0] / loads.sum() if loads.sum() > 0 else np.array([])
        entropy = float(-(shares * np.log2(shares)).sum())
        rows.append(
            {
                **dict(zip([*by, "layer"], key if isinstance(key, tuple) else (key,))),
                "experts": n,
                "selections": int(loads.sum()),
                "cv": loads.std() / mean if mean > 0 else np.nan,
                "gini": np.abs(loads[:, None] - loads[None, :]).sum() / (2 * n * n * mean) if mean > 0 else np.nan,
                "max_over_mean": loads.max() / mean if mean > 0 else np.nan,
                "entropy": entropy,
                "normalized_entropy": entropy / np.log2(n) if n > 1 else np.nan,
            }
        )
    return with_counted(pd.DataFrame(rows), tables, tokens)


def token_entropy(tables: Trace, by: Sequence[str] = (), *, per_token: bool = False, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """Routing entropy of each token: the entropy (bits) of its selected weights normalised to sum 1.

    With ``per_token=False`` (default) a summary per layer, columns ``*by, layer, tokens,
    mean_entropy, std_entropy, max_possible`` (``tokens`` the tokens routed at that layer,
    ``max_possible`` = log2 of the largest number of experts a token chose there). With
    ``per_token=True`` one row per token and layer: ``prompt_id, position, *by, layer, experts,
    entropy`` (``experts`` the number of experts the token chose there). Weights are assumed non-negative; a store
    without weights (imported from a serving engine) raises :class:`~moelens.store.StoreError`.
    """
    from moelens.store import require_weights

    require_weights(tables, "token_entropy")
    by = list(by)
    keys = key_list(by)
    # H = log2(S) - sum(w log2 w) / S with S = sum(w): one GROUP BY pass instead of a window
    per_token_sql = f"""
        SELECT prompt_id, position, {keys} layer, count(*) AS experts,
               greatest(log2(sum(weight::DOUBLE))
                        - sum(CASE WHEN weight > 0 THEN weight::DOUBLE * log2(weight::DOUBLE) ELSE 0 END) / sum(weight::DOUBLE), 0)
                   AS entropy
        FROM ({with_groups(tables, by, tokens)}) GROUP BY ALL
    """
    if per_token:
        return query(tables, per_token_sql + " ORDER BY ALL", tokens)
    return query(
        tables,
        f"""
        SELECT {keys} layer, count(*) AS tokens, avg(entropy) AS mean_entropy, stddev_pop(entropy) AS std_entropy,
               log2(max(experts)) AS max_possible
        FROM ({per_token_sql}) GROUP BY ALL ORDER BY ALL
        """,
        tokens,
    )


# --- co-activation ---------------------------------------------------------------------------------
def coactivation(tables: Trace, by: Sequence[str] = (), *, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """How often two experts of the same layer are chosen together for the same token.

    Columns: ``*by, layer, expert_a, expert_b, tokens`` with ``expert_a < expert_b``, ``tokens``
    the tokens that chose both at that layer; pairs never chosen together are absent.
    """
    by = list(by)
    return query(
        tables,
        f"""
        SELECT {key_list(by, 'a.')} a.layer, a.expert AS expert_a, b.expert AS expert_b, count(*) AS tokens
        FROM ({with_groups(tables, by, tokens)}) AS a
        JOIN routes AS b ON a.prompt_id = b.prompt_id AND a.position = b.position AND a.layer = b.layer AND a.expert < b.expert
        GROUP BY ALL ORDER BY ALL
        """,
        tokens,
    )


def transitions(tables: Trace, by: Sequence[str] = (), *, ranks: int | None = None, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """Expert-to-expert transitions between consecutive MoE layers, counted per token.

    For a token choosing expert ``e`` at MoE layer ``l`` and ``f`` at the next MoE layer ``m``, the pair
    (e, f) counts once (k x k pairs per token and layer pair). ``ranks`` restricts both sides to the
    first ``ranks`` experts (e.g. 1: top-1 to top-1; ``rank`` counts from 0). Columns: ``*by, layer,
    next_layer, expert, next_expert, tokens``, ``tokens`` the tokens that chose ``expert`` at
    ``layer`` and ``next_expert`` at ``next_layer``; absent pairs never occurred.
    """
    by = list(by)
    layers = tables.layers
    if len(layers) < 2:
        raise ValueError(f"transitions need at least two MoE layers; this trace has {layers}")
    pairs = ", ".join(f"({a}, {b})" for a, b in zip(layers, layers[1:]))
    rank_filter = f"AND a.rank < {int(ranks)} AND b.rank < {int(ranks)}" if ranks is not None else ""
    return query(
        tables,
        f"""
        WITH successor(layer, next_layer) AS (VALUES {pairs})
        SELECT {key_list(by, 'a.')} a.layer, n.next_layer, a.expert, b.expert AS next_expert, count(*) AS tokens
        FROM ({with_groups(tables, by, tokens)}) AS a
        JOIN successor AS n ON n.layer = a.layer
        JOIN routes AS b ON b.prompt_id = a.prompt_id AND b.position = a.position AND b.layer = n.next_layer
        WHERE TRUE {rank_filter}
        GROUP BY ALL ORDER BY ALL
        """,
        tokens,
    )


# --- stability between two traces --------------------------------------------------------------------
def routing_stability(tables: Trace, other: Trace, by: Sequence[str] = (), *, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """The fraction of tokens whose expert SET changes between two traces of the same prompts, per layer.

    Tokens are matched on (prompt_id, position) and layer; the order and weights of the experts do not
    matter, only which experts were chosen. Groups (``by``) are read from ``tables``. Columns:
    ``*by, layer, tokens, changed_tokens, changed_fraction, mean_jaccard, unmatched_tokens`` where
    ``tokens`` counts the matched tokens, ``changed_tokens`` those whose set differs,
    ``changed_fraction`` = changed_tokens / tokens, ``mean_jaccard`` is the mean |A & B| / |A | B|
    of the two sets and ``unmatched_tokens`` the tokens of ``tables`` at that layer absent from ``other``. Holds one row per
    (token, layer) of each trace in memory (the sets, not the events).
    """
    import duckdb

    by = list(by)

    def expert_sets(trace: Trace, grouping: Sequence[str]) -> pa.Table:
        return connection(trace).sql(
            f"""
            SELECT prompt_id::VARCHAR AS prompt_id, position::BIGINT AS position, {key_list(grouping)}
                   layer::BIGINT AS layer, list(expert::INTEGER ORDER BY expert) AS experts
            FROM ({with_groups(trace, grouping, tokens)}) GROUP BY ALL
            """
        ).to_arrow_table()

    joiner = duckdb.connect()
    joiner.register("a", expert_sets(tables, by))
    joiner.register("b", expert_sets(other, ()))
    return with_counted(joiner.sql(
        f"""
        SELECT {key_list(by, 'a.')} a.layer,
               count(b.experts) AS tokens,
               count(*) FILTER (WHERE b.experts IS NOT NULL AND a.experts <> b.experts) AS changed_tokens,
               changed_tokens / nullif(tokens, 0) AS changed_fraction,
               avg(len(list_intersect(a.experts, b.experts)) / len(list_distinct(list_concat(a.experts, b.experts))))
                   FILTER (WHERE b.experts IS NOT NULL) AS mean_jaccard,
               count(*) FILTER (WHERE b.experts IS NULL) AS unmatched_tokens
        FROM a LEFT JOIN b ON a.prompt_id = b.prompt_id AND a.position = b.position AND a.layer = b.layer
        GROUP BY ALL ORDER BY ALL
        """
    ).df(), tables, tokens)
