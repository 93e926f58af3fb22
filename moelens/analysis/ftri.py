"""fTRI contrast maps (after MoTE, "Mixture of Tunable Experts"): which experts are specific to a group of prompts.

For every prompt, the activation rate of (layer, expert) is the number of its tokens that selected
the expert (top-k) divided by its token count. Prompts are grouped by a tag; the target group's
mean rate is compared with the reference groups'. Tokens of one prompt are not independent, so
the test works on prompts: the group labels are permuted over the [prompts x (layer, expert)] rate
matrix (one matrix product per batch of permutations), and the p-values are Benjamini-Hochberg
adjusted over all (layer, expert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moelens.analysis.stats import check_tags, connection, literal, moe_layout, quote

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moelens.interventions import Intervention
    from moelens.store import TraceTables

_PERMUTATION_BATCH = 256  # permutations per matrix product: bounds memory at batch x (layers * experts)


def ftri_scores(
    tables: TraceTables,
    tag: str,
    target: Any,
    reference: Any | Sequence[Any] | None = None,
    *,
    permutations: int = 1000,
    seed: int = 0,
    pseudo_count: float = 0.5,
) -> pd.DataFrame:
    """Rank every (layer, expert) by how much more often the ``target`` prompts select it.

    Args:
        tables: a trace with a ``prompts`` table carrying the column ``tag``.
        tag: the prompt column that defines the groups (e.g. ``"domain"``).
        target: the value of ``tag`` of the target group.
        reference: a value or a list of values forming the reference groups; default every other
            (non-null) value. Each reference value is one group.
        permutations: label permutations for the test (seeded by ``seed``); 0 skips the test.
        pseudo_count: added to both selection and non-selection counts in the log-odds ratio.

    Returns:
        one row per (layer, expert), sorted by ``difference`` (most target-specific first), columns
        ``rank, layer, expert, target_rate, reference_rate, difference, log_odds, p_value, q_value,
        target_prompts, reference_prompts``: ``target_rate`` is the mean over target prompts of
        their activation rate, ``reference_rate`` the mean over reference groups of each group's
        mean rate, ``difference`` their difference (the fTRI score), ``log_odds`` the log odds ratio
        of selection per token with all tokens of each side pooled, ``p_value`` the two-sided
        permutation p-value of ``difference`` and ``q_value`` its Benjamini-Hochberg adjustment.
    """
    import numpy as np
    import pandas as pd

    rates, selections, tokens, labels, features = _prompt_rates(tables, tag, target, reference)
    weights = _contrast_weights(labels)
    observed = weights @ rates
    in_target = labels == 0
    table = pd.DataFrame(features, columns=["layer", "expert"])
    table["target_rate"] = rates[in_target].mean(axis=0)
    table["reference_rate"] = table["target_rate"] - observed
    table["difference"] = observed
    hits_t, tokens_t = selections[in_target].sum(axis=0), tokens[in_target].sum()
    hits_r, tokens_r = selections[~in_target].sum(axis=0), tokens[~in_target].sum()
    table["log_odds"] = np.log((hits_t + pseudo_count) / (tokens_t - hits_t + pseudo_count)) - np.log(
        (hits_r + pseudo_count) / (tokens_r - hits_r + pseudo_count)
    )
    if permutations > 0:
        table["p_value"] = _permutation_p_values(rates, weights, observed, permutations, seed)
        table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy())
    else:
        table["p_value"] = table["q_value"] = np.nan
    table["target_prompts"] = int(in_target.sum())
    table["reference_prompts"] = int((~in_target).sum())
    table = table.sort_values(["difference", "layer", "expert"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def _prompt_rates(
    tables: TraceTables, tag: str, target: Any, reference: Any | Sequence[Any] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-prompt matrices over the chosen groups.

    Returns (rates [P, F], selection counts [P, F], token counts [P], group labels [P] with 0 =
    target and 1.. = reference groups, features [F, 2] = (layer, expert)).
    """
    import numpy as np

    check_tags(tables, [tag])
    if reference is None:
        groups_sql = f"{quote(tag)} IS NOT NULL"
    else:
        values = list(reference) if isinstance(reference, (list, tuple, set, frozenset)) else [reference]
        groups_sql = f"{quote(tag)} IN ({', '.join(literal(v) for v in [target, *values])})"
    # the label: 0 for the target, 1.. for each reference value (dense_rank over the other values)
    chosen = f"""
        SELECT prompt_id,
               CASE WHEN {quote(tag)} = {literal(target)} THEN 0
                    ELSE dense_rank() OVER (ORDER BY {quote(tag)} = {literal(target)}, {quote(tag)}::VARCHAR) END AS label
        FROM prompts WHERE {groups_sql}
    """
    handle = connection(tables)
    prompts = handle.sql(
        f"""
        WITH chosen AS ({chosen})
        SELECT c.prompt_id, c.label, count(t.position) AS tokens
        FROM chosen AS c LEFT JOIN tokens AS t ON t.prompt_id = c.prompt_id
        GROUP BY ALL ORDER BY c.prompt_id
        """
    ).fetchnumpy()
    labels = np.asarray(prompts["label"], dtype=np.int64)
    if not (labels == 0).any():
        raise ValueError(f"no prompt has {tag} = {target!r}")
    if not (labels > 0).any():
        raise ValueError(f"no reference prompts: no other value of {tag!r} than {target!r} (or none of {reference!r})")
    layers, num_experts = moe_layout(tables)
    layer_index = np.full(max(layers) + 1, -1, dtype=np.int64)
    layer_index[layers] = np.arange(len(layers))
    prompt_ids = np.asarray(prompts["prompt_id"])  # sorted by the query
    num_features = len(layers) * num_experts
    files = tables.files("routes") if hasattr(tables, "files") else []
    if files and np.issubdtype(prompt_ids.dtype, np.integer):
        selections = _streamed_selections(files, prompt_ids, layer_index, num_experts).astype(np.float64)
    else:
        # all prompts are aggregated and the unchosen ones dropped below: a join restricting the
        # scan to the chosen prompts costs more than the extra groups
        counts = handle.sql("SELECT prompt_id, layer, expert, count(*) AS selections FROM routes GROUP BY ALL").fetchnumpy()
        rows = _rows_of(prompt_ids, np.asarray(counts["prompt_id"]))
        chosen_rows = rows >= 0
        columns = layer_index[np.asarray(counts["layer"], dtype=np.int64)] * num_experts + np.asarray(counts["expert"], dtype=np.int64)
        selections = np.bincount(
            (rows * num_features + columns)[chosen_rows],
            weights=np.asarray(counts["selections"], dtype=np.float64)[chosen_rows],
            minlength=len(labels) * num_features,
        )
    selections = selections.reshape(len(labels), num_features)
    tokens = np.asarray(prompts["tokens"], dtype=np.float64)
    rates = selections / np.maximum(tokens, 1)[:, None]
    features = np.stack([np.repeat(layers, num_experts), np.tile(np.arange(num_experts), len(layers))], axis=1)
    return rates, selections, tokens, labels, features


def _rows_of(prompt_ids: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Row of each ``found`` id in the sorted ``prompt_ids``; -1 for ids not among them."""
    import numpy as np

    rows = np.searchsorted(prompt_ids, found).clip(max=prompt_ids.size - 1)
    return np.where(prompt_ids[rows] == found, rows, -1)


def _streamed_selections(files: Sequence[str], prompt_ids: np.ndarray, layer_index: np.ndarray, num_experts: int) -> np.ndarray:
    """Selection counts [P * F] by a bincount over the routes files, streamed in row batches.

    A per-(prompt, layer, expert) GROUP BY has too many groups for DuckDB's direct-indexed
    aggregation; numpy's bincount over a packed key is ~2.5x faster and, one worker per core
    (numpy releases the GIL), never holds more than a batch of events per worker. Rows of one
    prompt are contiguous in a shard, so ids are mapped to rows once per run, not per event.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pyarrow.parquet as pq

    num_features = layer_index[layer_index >= 0].size * num_experts
    workers = max(1, min(len(files), os.cpu_count() or 1, 8))

    def count(share: Sequence[str]) -> np.ndarray:
        totals = np.zeros(prompt_ids.size * num_features, dtype=np.int64)
        for path in share:
            batches = pq.ParquetFile(path).iter_batches(columns=["prompt_id", "layer", "expert"], batch_size=1 << 21, use_threads=False)
            for batch in batches:
                ids = batch.column(0).to_numpy()
                starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # runs of one prompt
                rows = np.repeat(_rows_of(prompt_ids, ids[starts]), np.diff(np.r_[starts, ids.size]))
                key = rows * num_features + layer_index[batch.column(1).to_numpy()] * num_experts + batch.column(2).to_numpy()
                key = key[rows >= 0]
                if key.size:
                    low, high = int(key.min()), int(key.max())
                    totals[low : high + 1] += np.bincount(key - low, minlength=high - low + 1)
        return totals

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(count, [files[i::workers] for i in range(workers)]))


def _contrast_weights(labels: np.ndarray) -> np.ndarray:
    """Prompt weights w with w @ rates = target mean - mean over reference groups of group means."""
    import numpy as np

    sizes = np.bincount(labels)
    reference_groups = np.count_nonzero(sizes[1:])
    return np.where(labels == 0, 1.0 / sizes[0], -1.0 / (reference_groups * sizes[labels]))


def _permutation_p_values(rates: np.ndarray, weights: np.ndarray, observed: np.ndarray, permutations: int, seed: int) -> np.ndarray:
    """Two-sided p-values: permuting the labels permutes the weights (group sizes are kept)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    exceed = np.zeros(rates.shape[1], dtype=np.int64)
    threshold = np.abs(observed) - 1e-12  # ties (e.g. rates identical by symmetry) count as exceeding
    for start in range(0, permutations, _PERMUTATION_BATCH):
        batch = min(_PERMUTATION_BATCH, permutations - start)
        shuffled = rng.permuted(np.broadcast_to(weights, (batch, weights.size)), axis=1)
        exceed += (np.abs(shuffled @ rates) >= threshold).sum(axis=0)
    return (1 + exceed) / (1 + permutations)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order; NaNs stay NaN."""
    import numpy as np

    p = np.asarray(p_values, dtype=np.float64)
    q = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = order.size
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def top_experts(table: pd.DataFrame, n: int) -> dict[int, list[int]]:
    """The first ``n`` rows of a ranked table as {layer: [experts]} (shared by the spec helpers)."""
    chosen: dict[int, list[int]] = {}
    for layer, expert in table.head(n)[["layer", "expert"]].itertuples(index=False):
        chosen.setdefault(int(layer), []).append(int(expert))
    return chosen


def to_spec(table: pd.DataFrame, n: int, kind: str = "switch_off", **options: Any) -> Intervention:
    """An intervention on the top ``n`` experts per layer of an :func:`ftri_scores` table (in its row order).

    Kinds:
        ``"switch_off"`` (default, MoTE's): the experts stay selected but their weight is zeroed and
            the remaining chosen experts are renormalised to the original total; no other expert
            takes the slot (``disable(experts, mode="drop", renormalize=True)``).
        ``"reroute"``: the experts leave the choice and the next-best expert takes each slot
            (``disable(experts, mode="reroute")``): a different intervention from the paper's.
        ``"force"``: the experts are inserted into every token's selected set (``force(experts)``).

    ``options`` go to the constructor (``tokens``, and for ``reroute`` nothing else).
    """
    from moelens import interventions

    builders = {
        "switch_off": lambda experts, **o: interventions.disable(experts, mode="drop", renormalize=True, **o),
        "reroute": lambda experts, **o: interventions.disable(experts, mode="reroute", **o),
        "force": interventions.force,
    }
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    return builders[kind](top_experts(table, n), **options)
