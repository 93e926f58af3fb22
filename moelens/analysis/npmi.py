"""nPMI expert-token association (after RICE, "Two Experts Are All You Need for Steering Thinking").

For a token condition y (the token is one of some marker strings, matches a regex, or belongs to a
prompt with a given tag) and the event x = "expert e of layer l is among the token's top-k", over
the T traced tokens::

    nPMI = log(p(x, y) / (p(x) p(y))) / -log p(x, y)   in [-1, 1]

with -1 when x and y never co-occur and 1 when both hold for every token (p(x, y) = 1). All
conditions of one call are counted in a single pass over ``routes``: each token carries a bit mask
of the conditions it satisfies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from moelens.analysis.ftri import top_experts
from moelens.analysis.stats import check_tags, literal, moe_layout, one_row, query, quote, with_counted
from moelens.analysis.token_filter import ALL_TOKENS, TokenFilter, filtered_routes, filtered_tokens

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moelens.interventions import Intervention
    from moelens.store import Trace

_COUNT_COLUMNS = ["joint", "expert_count", "condition_count", "tokens"]


def npmi_scores(
    tables: Trace,
    *,
    markers: Iterable[str] | None = None,
    regex: str | None = None,
    tag: Mapping[str, Any] | None = None,
    min_count: int = 5,
    tokens: TokenFilter = ALL_TOKENS,
) -> pd.DataFrame:
    """nPMI between each (layer, expert) and one token condition; give exactly one of the three.

    Args:
        markers: token strings (exact, as in ``tokens.token``); the condition is "the token is one of them".
        regex: a regular expression searched in ``tokens.token`` (anchor it with ^...$ for a full match).
        tag: {column: value} of the ``prompts`` table; the condition is "the token's prompt has these tags".
        min_count: minimum support: rows whose joint count (tokens satisfying the condition that
            selected the expert) is below it are dropped.
        tokens: the tokens counted, in every count (default: all but special tokens; ``attrs["tokens"]``).

    Returns:
        sorted by ``npmi`` descending, columns ``rank, layer, expert, joint, expert_count,
        condition_count, tokens, p_joint, p_expert, p_condition, npmi, npmi_low, npmi_high``: the
        counts are RICE's k_n (joint), K_n (expert_count), M (condition_count) and T (tokens);
        ``npmi_low``/``npmi_high`` the 95% interval of :func:`npmi_interval`. With ~30 marker
        tokens and thousands of experts the top pairs can be chance: rank by ``npmi_low`` to
        prefer pairs whose association is supported by their counts.
    """
    given = [c for c in (markers, regex, tag) if c is not None]
    if len(given) != 1:
        raise ValueError("give exactly one condition: markers=..., regex=... or tag=...")
    if markers is not None:
        predicate = _marker_predicate(list(markers))
    elif regex is not None:
        predicate = f"regexp_matches(t.token, {literal(regex)})"
    else:
        assert tag is not None
        check_tags(tables, list(tag))
        predicate = " AND ".join(f"p.{quote(column)} = {literal(value)}" for column, value in tag.items()) or "TRUE"
    counts = condition_counts(tables, [predicate], prompt_tags=tag is not None, tokens=tokens)
    table = _with_npmi(counts.drop(columns="condition"))
    table = table[table["joint"] >= min_count]
    return with_counted(_ranked(table, "npmi"), tables, tokens)


def npmi_combined(tables: Trace, signed_markers: Sequence[str], *, min_count: int = 5, tokens: TokenFilter = ALL_TOKENS) -> pd.DataFrame:
    """A signed sum of nPMIs over several marker tokens, e.g. ``["+<think>", "-</think>"]``.

    Each entry is a token string with an optional leading ``+`` (default) or ``-``. Score =
    sum of sign x nPMI(expert, marker). Minimum support: a row is kept when its joint count reaches
    ``min_count`` for every positive marker. Columns: ``rank, layer, expert, score`` then, per marker,
    ``npmi[<marker>]`` and ``joint[<marker>]`` (marker without its sign); sorted by ``score``.
    """
    import numpy as np

    parsed = [(-1.0, m[1:]) if m.startswith("-") else (1.0, m[1:] if m.startswith("+") else m) for m in signed_markers]
    if not parsed:
        raise ValueError("give at least one marker")
    counts = _with_npmi(condition_counts(tables, [_marker_predicate([token]) for _, token in parsed], tokens=tokens))
    wide = counts.pivot(index=["layer", "expert"], columns="condition", values=["npmi", "joint"])
    table = wide.index.to_frame(index=False)
    signs = np.array([sign for sign, _ in parsed])
    table["score"] = wide["npmi"].to_numpy() @ signs
    supported = np.ones(len(table), dtype=bool)
    for index, (sign, token) in enumerate(parsed):
        table[f"npmi[{token}]"] = wide["npmi"][index].to_numpy()
        table[f"joint[{token}]"] = wide["joint"][index].to_numpy()
        if sign > 0:
            supported &= table[f"joint[{token}]"].to_numpy() >= min_count
    return with_counted(_ranked(table[supported], "score"), tables, tokens)


def condition_counts(
    tables: Trace, predicates: Sequence[str], *, prompt_tags: bool = False, tokens: TokenFilter = ALL_TOKENS
) -> pd.DataFrame:
    """Counts for every (condition, layer, expert), never-selected experts included.

    ``predicates`` are SQL conditions over ``t`` (the ``tokens`` row) and, with ``prompt_tags``, ``p``
    (its ``prompts`` row).
    Columns: ``condition`` (index into ``predicates``), ``layer, expert, joint`` (tokens satisfying
    the condition that selected the expert), ``expert_count`` (tokens that selected it),
    ``condition_count`` (tokens satisfying the condition) and ``tokens`` (all counted tokens), every
    count over the tokens ``tokens`` keeps.
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
    expert_counts = query(tables, f"SELECT layer, expert, count(*) AS expert_count FROM {filtered_routes(tables, tokens)} GROUP BY ALL")
    joint_counts = query(
        tables,
        f"""
        WITH hits AS (SELECT * FROM ({flagged}) WHERE flags <> 0)
        SELECT r.layer, r.expert, {satisfied('h.flags')}
        FROM routes AS r JOIN hits AS h ON h.prompt_id = r.prompt_id AND h.position = r.position
        GROUP BY ALL
        """,
    )
    layers, num_experts = moe_layout(tables)
    grid = pd.MultiIndex.from_product([layers, range(num_experts)], names=["layer", "expert"])
    counts = pd.concat(
        [frame.astype({"layer": "int64", "expert": "int64"}).set_index(["layer", "expert"]) for frame in (expert_counts, joint_counts)], axis=1
    ).reindex(grid).fillna(0)
    frames = []
    for index in range(len(predicates)):
        frame = grid.to_frame(index=False)
        frame.insert(0, "condition", index)
        frame["joint"] = counts[f"c{index}"].to_numpy(dtype=np.int64)
        frame["expert_count"] = counts["expert_count"].to_numpy(dtype=np.int64)
        frame["condition_count"] = int(totals[1 + index])
        frame["tokens"] = int(totals[0])
        frames.append(frame)
    return with_counted(pd.concat(frames, ignore_index=True), tables, tokens)


def npmi_from_counts(joint: np.ndarray, expert_count: np.ndarray, condition_count: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """nPMI from counts (vectorised); -1 where the joint count is 0, 1 where p(x, y) = 1."""
    import numpy as np

    joint, expert_count, condition_count, tokens = (np.asarray(a, dtype=np.float64) for a in (joint, expert_count, condition_count, tokens))
    with np.errstate(divide="ignore", invalid="ignore"):
        p_joint = joint / tokens
        pmi = np.log(p_joint / ((expert_count / tokens) * (condition_count / tokens)))
        value = pmi / -np.log(p_joint)
    value = np.where(joint == 0, -1.0, value)
    return np.where(joint == tokens, 1.0, value)


def npmi_interval(
    joint: np.ndarray, expert_count: np.ndarray, condition_count: np.ndarray, tokens: np.ndarray, z: float = 1.96
) -> tuple[np.ndarray, np.ndarray]:
    """A count-based confidence interval for nPMI (vectorised): the Wilson score interval of
    p(expert | condition) = joint / condition_count at ``z`` (1.96: 95%), mapped through nPMI with
    the expert's and the condition's counts held fixed. The joint count is what is small (a few dozen
    marker tokens), so it carries most of the uncertainty; the interval ignores the rest."""
    import numpy as np

    m = np.asarray(condition_count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.asarray(joint, dtype=np.float64) / m
        center = (q + z * z / (2 * m)) / (1 + z * z / m)
        half = z * np.sqrt(q * (1 - q) / m + z * z / (4 * m * m)) / (1 + z * z / m)
    bounds = [npmi_from_counts(np.clip(c, 0, 1) * m, expert_count, condition_count, tokens) for c in (center - half, center + half)]
    return np.fmin(*bounds), np.fmax(*bounds)


def _with_npmi(counts: pd.DataFrame) -> pd.DataFrame:
    counts = counts.copy()
    counts["p_joint"] = counts["joint"] / counts["tokens"]
    counts["p_expert"] = counts["expert_count"] / counts["tokens"]
    counts["p_condition"] = counts["condition_count"] / counts["tokens"]
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
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def to_spec(table: pd.DataFrame, n: int, factor: float, *, renormalize: bool = False, **options: Any) -> Intervention:
    """``moelens.interventions.reweight`` of the top ``n`` experts of an nPMI table (in its row order).

    ``factor`` multiplies their routing weights (RICE steers with large factors, e.g. 64 for 2
    experts); ``options`` pass through (``tokens``).
    """
    from moelens.interventions import reweight

    return reweight(top_experts(table, n), factor, renormalize=renormalize, **options)
