"""nPMI expert-token association (after RICE, "Two Experts Are All You Need for Steering Thinking").

For a token condition y (the token is one of some marker strings, matches a regex, or belongs to a
prompt whose tags match ``where``) and the event x = "expert e of layer l is among the token's top-k", over
the T traced tokens::

    nPMI = log(p(x, y) / (p(x) p(y))) / -log p(x, y)   in [-1, 1]

with -1 when x and y never co-occur and 1 when both hold for every token (p(x, y) = 1). All
conditions of one call are counted in a single pass over ``routes``: each token carries a bit mask
of the conditions it satisfies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from moelens.analysis.stats import check_tags, literal, one_row, query, quote, with_counted
from moelens.analysis.token_filter import ALL_TOKENS, TokenFilter, filtered_routes, filtered_tokens

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moelens.interventions import Intervention
    from moelens.store import Trace

_COUNT_COLUMNS = ["joint_tokens", "expert_tokens", "condition_tokens", "tokens"]


def npmi_scores(
    tables: Trace,
    *,
    markers: Iterable[str] | None = None,
    regex: str | None = None,
    where: Mapping[str, Any] | None = None,
    min_count: int = 5,
    tokens: TokenFilter = ALL_TOKENS,
) -> pd.DataFrame:
    """nPMI between each (layer, expert) and one token condition; give exactly one of the three.

    Args:
        markers: token strings (exact, as in ``tokens.token``); the condition is "the token is one of them".
        regex: a regular expression searched in ``tokens.token`` (anchor it with ^...$ for a full match).
        where: {column: value} of the ``prompts`` table (its tags); the condition is "the token's
            prompt has all these values" (a condition on prompt tags, not a grouping).
        min_count: minimum support, in tokens: rows whose ``joint_tokens`` is below it are dropped.
        tokens: the tokens counted, in every count (default: all but special tokens; ``attrs["tokens"]``).

    Returns:
        one row per (layer, expert) with enough support, sorted by ``npmi`` descending, columns
        ``place, layer, expert, joint_tokens, expert_tokens, condition_tokens, tokens, p_joint,
        p_expert, p_condition, npmi, npmi_low, npmi_high``. ``place`` is the row's place in that
        order (1 = first). Every count is of counted tokens (a token selects an expert at most once
        per layer): ``joint_tokens`` satisfy the condition and selected the expert (RICE's k_n),
        ``expert_tokens`` selected it (K_n), ``condition_tokens`` satisfy the condition (M) and
        ``tokens`` is all of them (T); ``p_*`` are those counts over ``tokens``.
        ``npmi_low``/``npmi_high`` the 95% interval of :func:`npmi_interval`. With ~30 marker
        tokens and thousands of experts the top pairs can be chance: sort by ``npmi_low`` to
        prefer pairs whose association is supported by their counts.
    """
    given = [c for c in (markers, regex, where) if c is not None]
    if len(given) != 1:
        raise ValueError("give exactly one condition: markers=..., regex=... or where=...")
    if markers is not None:
        predicate = _marker_predicate(list(markers))
    elif regex is not None:
        predicate = f"regexp_matches(t.token, {literal(regex)})"
    else:
        assert where is not None
        check_tags(tables, list(where), "where")
        predicate = " AND ".join(f"p.{quote(column)} = {literal(value)}" for column, value in where.items()) or "TRUE"
    counts = condition_counts(tables, [predicate], prompt_tags=where is not None, tokens=tokens)
    table = _with_npmi(counts.drop(columns="condition"))
    table = table[table["joint_tokens"] >= min_count]
    return with_counted(_ranked(table, "npmi"), tables, tokens)


def npmi_combined(tables: Trace, signed_markers: Sequence[str], *, min_count: int = 5, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """A signed sum of nPMIs over several marker tokens, e.g. ``["+<think>", "-</think>"]``.

    Each entry is a token string with an optional leading ``+`` (default) or ``-``. Score =
    sum of sign x nPMI(expert, marker). Minimum support: a row is kept when its joint token count
    reaches ``min_count`` for every positive marker. Columns: ``place, layer, expert, score`` then,
    per marker, ``npmi[<marker>]`` and ``joint_tokens[<marker>]`` (the counted tokens that are the
    marker and selected the expert; marker without its sign); sorted by ``score`` descending,
    ``place`` 1 = first row. Counts as in :func:`npmi_scores`.
    """
    import numpy as np

    parsed = [(-1.0, m[1:]) if m.startswith("-") else (1.0, m[1:] if m.startswith("+") else m) for m in signed_markers]
    if not parsed:
        raise ValueError("give at least one marker")
    counts = _with_npmi(condition_counts(tables, [_marker_predicate([token]) for _, token in parsed], tokens=tokens))
    wide = counts.pivot(index=["layer", "expert"], columns="condition", values=["npmi", "joint_tokens"])
    table = wide.index.to_frame(index=False)
    signs = np.array([sign for sign, _ in parsed])
    table["score"] = wide["npmi"].to_numpy() @ signs
    supported = np.ones(len(table), dtype=bool)
    for index, (sign, token) in enumerate(parsed):
        table[f"npmi[{token}]"] = wide["npmi"][index].to_numpy()
        table[f"joint_tokens[{token}]"] = wide["joint_tokens"][index].to_numpy()
        if sign > 0:
            supported &= table[f"joint_tokens[{token}]"].to_numpy() >= min_count
    return with_counted(_ranked(table[supported], "score"), tables, tokens)


def condition_counts(
    tables: Trace, predicates: Sequence[str], *, prompt_tags: bool = False, tokens: TokenFilter = ALL_TOKENS
) -> pd.DataFrame:
    """Counts for every (condition, layer, expert), never-selected experts included.

    ``predicates`` are SQL conditions over ``t`` (the ``tokens`` row) and, with ``prompt_tags``, ``p``
    (its ``prompts`` row).
    Columns: ``condition`` (index into ``predicates``), ``layer, expert, joint_tokens`` (tokens
    satisfying the condition that selected the expert), ``expert_tokens`` (tokens that selected it),
    ``condition_tokens`` (tokens satisfying the condition) and ``tokens`` (all counted tokens), every
    count in tokens, over the tokens ``tokens`` keeps.
    """
    import numpy as np
    import pandas as pd

    if len(predicates) > 62:
        raise ValueError("at most 62 conditions per call (they share one 64-bit mask)")
    mask = " + ".join(f"(CASE WHEN {pred} THEN {1 << i} ELSE 0 END)" for i, pred in enumerate(predicates))
    prompts_join = "LEFT JOIN prompts AS p ON p.prompt_id = t.prompt_id" if prompt_tags else ""
    flagged = f"SELECT t.prompt_id, t.position, ({mask})::BIGINT AS flags FROM ({filtered_tokens(tables, tokens)}) AS t {prompts_join}"

    def satisfied(flags: str) -> str:
        """One count per condition: c0, c1, ..."""
        return ", ".join(f"count(*) FILTER (WHERE {flags} & {1 << i} <> 0) AS c{i}" for i in range(len(predicates)))

    totals = one_row(tables, f"SELECT count(*) AS tokens, {satisfied('flags')} FROM ({flagged})")
    # two scans, each grouped by (layer, expert) only (a direct-indexed aggregation): all selections,
    # then an inner join with the satisfying tokens, whose small build side keeps the probe cheap;
    # a single LEFT JOIN pass is slower than both together
    expert_counts = query(tables, f"SELECT layer, expert, count(*) AS expert_tokens FROM {filtered_routes(tables, tokens)} GROUP BY ALL")
    joint_counts = query(
        tables,
        f"""
        WITH hits AS (SELECT * FROM ({flagged}) WHERE flags <> 0)
        SELECT r.layer, r.expert, {satisfied('h.flags')}
        FROM routes AS r JOIN hits AS h ON h.prompt_id = r.prompt_id AND h.position = r.position
        GROUP BY ALL
        """,
    )
    layers, num_experts = tables.layers, tables.experts
    grid = pd.MultiIndex.from_product([layers, range(num_experts)], names=["layer", "expert"])
    counts = pd.concat(
        [frame.astype({"layer": "int64", "expert": "int64"}).set_index(["layer", "expert"]) for frame in (expert_counts, joint_counts)], axis=1
    ).reindex(grid).fillna(0)
    frames = []
    for index in range(len(predicates)):
        frame = grid.to_frame(index=False)
        frame.insert(0, "condition", index)
        frame["joint_tokens"] = counts[f"c{index}"].to_numpy(dtype=np.int64)
        frame["expert_tokens"] = counts["expert_tokens"].to_numpy(dtype=np.int64)
        frame["condition_tokens"] = int(totals[1 + index])
        frame["tokens"] = int(totals[0])
        frames.append(frame)
    return with_counted(pd.concat(frames, ignore_index=True), tables, tokens)


def npmi_from_counts(
    joint_tokens: np.ndarray, expert_tokens: np.ndarray, condition_tokens: np.ndarray, tokens: np.ndarray
) -> np.ndarray:
    """nPMI from token counts (vectorised; the columns of :func:`condition_counts`); -1 where
    ``joint_tokens`` is 0, 1 where p(x, y) = 1."""
    import numpy as np

    joint, expert, condition, tokens = (np.asarray(a, dtype=np.float64) for a in (joint_tokens, expert_tokens, condition_tokens, tokens))
    with np.errstate(divide="ignore", invalid="ignore"):
        p_joint = joint / tokens
        pmi = np.log(p_joint / ((expert / tokens) * (condition / tokens)))
        value = pmi / -np.log(p_joint)
    value = np.where(joint == 0, -1.0, value)
    return np.where(joint == tokens, 1.0, value)


def npmi_interval(
    joint_tokens: np.ndarray, expert_tokens: np.ndarray, condition_tokens: np.ndarray, tokens: np.ndarray, z: float = 1.96
) -> tuple[np.ndarray, np.ndarray]:
    """A count-based confidence interval for nPMI (vectorised, token counts as in
    :func:`npmi_from_counts`): the Wilson score interval of p(expert | condition) = joint_tokens /
    condition_tokens at ``z`` (1.96: 95%), mapped through nPMI with the expert's and the condition's
    counts held fixed. The joint count is what is small (a few dozen marker tokens), so it carries
    most of the uncertainty; the interval ignores the rest."""
    import numpy as np

    m = np.asarray(condition_tokens, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.asarray(joint_tokens, dtype=np.float64) / m
        center = (q + z * z / (2 * m)) / (1 + z * z / m)
        half = z * np.sqrt(q * (1 - q) / m + z * z / (4 * m * m)) / (1 + z * z / m)
    bounds = [npmi_from_counts(np.clip(c, 0, 1) * m, expert_tokens, condition_tokens, tokens) for c in (center - half, center + half)]
    return np.fmin(*bounds), np.fmax(*bounds)


def _with_npmi(counts: pd.DataFrame) -> pd.DataFrame:
    counts = counts.copy()
    counts["p_joint"] = counts["joint_tokens"] / counts["tokens"]
    counts["p_expert"] = counts["expert_tokens"] / counts["tokens"]
    counts["p_condition"] = counts["condition_tokens"] / counts["tokens"]
    counts["npmi"] = npmi_from_counts(*(counts[c].to_numpy() for c in _COUNT_COLUMNS))
    counts["npmi_low"], counts["npmi_high"] = npmi_interval(*(counts[c].to_numpy() for c in _COUNT_COLUMNS))
    return counts


def _marker_predicate(markers: list[str]) -> str:
    if not markers:
        raise ValueError("markers must name at least one token string")
    return f"t.token IN ({', '.join(literal(m) for m in markers)})"


def _ranked(table: pd.DataFrame, score: str) -> pd.DataFrame:
    import numpy as np

    table = table.sort_values([score, "layer", "expert"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
    table.insert(0, "place", np.arange(1, len(table) + 1))
    return table


def top_experts(table: pd.DataFrame, n: int) -> dict[int, list[int]]:
    """The first ``n`` rows of an :func:`npmi_scores` or :func:`npmi_combined` table, counted over all
    layers (not per layer), in the table's row order (by ``npmi`` / ``score``, or as you re-sorted
    it, e.g. by ``npmi_low``), as {layer: sorted experts}; ``n`` >= 1."""
    from moelens.analysis._specs import first_rows

    return first_rows(table, n)


def to_spec(
    table: pd.DataFrame, n: int, *, kind: str = "reweight", factor: float | None = None, renormalize: bool = False, **options: Any
) -> Intervention:
    """An intervention on :func:`top_experts` ``(table, n)``: the table's first ``n`` experts over all
    layers (not per layer; RICE picks its experts over the whole model, e.g. two).

    Kinds:
        ``"reweight"`` (default, RICE's): their routing weights are multiplied by ``factor`` (RICE
            steers with large factors, e.g. 64 for 2 experts), the others renormalised with
            ``renormalize`` (``reweight(experts, factor, renormalize=...)``).
        ``"drop"``: they stay selected, their output is zeroed, the others renormalised with
            ``renormalize`` (``disable(experts, mode=Drop(renormalize=...))``).
        ``"reroute"``: they leave the choice and the next-best expert takes each slot (``disable(experts)``).

    ``factor`` (default 64.0) applies to ``"reweight"`` only and ``renormalize`` not to ``"reroute"``:
    given where it does not apply, it is refused. ``options`` go to the constructor (``tokens``).
    """
    from moelens import interventions
    from moelens.analysis._specs import build, disable_builders

    if factor is not None and kind != "reweight":
        raise ValueError(f"npmi to_spec: factor applies to kind='reweight' only, not {kind!r}")
    if renormalize and kind == "reroute":
        raise ValueError("npmi to_spec: renormalize does not apply to kind='reroute' (the next choice takes the slot)")
    factor = 64.0 if factor is None else factor

    builders = {
        "reweight": lambda experts, **o: interventions.reweight(experts, factor, renormalize=renormalize, **o),
        **disable_builders(renormalize=renormalize),
    }
    return build(kind, builders, top_experts(table, n), **options)
