"""fTRI contrast maps (after MoTE, "Mixture of Tunable Experts"): which experts are specific to a group of prompts.

For every prompt, the activation rate of (layer, expert) is the number of its tokens that selected
the expert (top-k) divided by its token count. Prompts are grouped by a tag; the target group's
mean rate is compared with the reference groups'. Tokens of one prompt are not independent, so
the test works on prompts: the group labels are permuted over the [prompts x (layer, expert)] rate
matrix (one matrix product per batch of permutations), sequentially (a feature stops once its
p-value is clearly large), with a budget that grows with the number of features, and the p-values
are Benjamini-Hochberg adjusted over all (layer, expert).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from moelens.analysis.stats import check_tags, connection, literal, quote
from moelens.analysis.token_filter import PROMPT_TOKENS, TokenFilter, filtered_routes

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moelens.interventions import Intervention
    from moelens.store import Trace

_PERMUTATION_ELEMENTS = 1 << 22  # permutations per matrix product x max(running features, prompts): ~32 MB


def ftri_scores(
    tables: Trace,
    tag: str,
    target: Any,
    reference: Any | Sequence[Any] | None = None,
    *,
    permutations: int | Literal["auto"] = "auto",
    seed: int = 0,
    pseudo_count: float = 0.5,
    stop_after: int = 10,
    tokens: TokenFilter = PROMPT_TOKENS,
) -> pd.DataFrame:
    """Rank every (layer, expert) by how much more often the ``target`` prompts select it.

    Args:
        tables: a :class:`~moelens.store.Trace`, in memory or a store, whose ``prompts`` table
            carries the column ``tag`` (``moelens.trace(model, prompts=..., tags={tag: [...]})``
            or a store collected from tagged records).
        tag: the prompt column that defines the groups (e.g. ``"domain"``).
        target: the value of ``tag`` of the target group.
        reference: a value or a list of values forming the reference groups; default every other
            (non-null) value. Each reference value is one group.
        permutations: the most label permutations a feature gets in the test (seeded by ``seed``);
            ``"auto"`` (default): :func:`permutation_budget` of the number of (layer, expert)
            features, so that the smallest attainable q-value lies far below 0.05 (with a fixed
            1000 permutations, one strong feature among 6,144 gets p = 1/1001, p x m = 6.1: BH
            cannot call it significant); 0 skips the test.
        pseudo_count: added to both selection and non-selection counts in the log-odds ratio.
        stop_after: a feature's sequential test stops once this many permuted statistics reached
            its observed one (see :func:`_permutation_p_values`).
        tokens: the tokens counted, in selections and in each prompt's token count (default: the
            prompt's tokens without special tokens, as MoTE counts; ``attrs["tokens"]`` says which).

    The table's ``attrs`` record the test: ``permutations`` (the budget B), ``permutations_run``
    (the most any feature got, L), ``p_floor`` (1 / (L + 1), the smallest p-value it gave; a
    feature at the floor may have a smaller true p), ``stop_after``; column ``permutations_used``
    gives each feature's count. Deviation from MoTE: the paper ranks by the difference and reports
    no test; the test here is moelens' own.

    Returns:
        one row per (layer, expert), sorted by ``difference`` (most target-specific first), columns
        ``place, layer, expert, target_rate, reference_rate, difference, log_odds, p_value,
        permutations_used, q_value, target_prompts, reference_prompts``: ``place`` is the row's
        place in that order (1 = first), ``target_rate`` the mean over target prompts of their
        activation rate (the prompt's counted tokens that selected the expert / its counted tokens),
        ``reference_rate`` the mean over reference groups of each group's
        mean rate, ``difference`` their difference (the fTRI score), ``log_odds`` the log odds ratio
        of selection per token with all tokens of each side pooled, ``p_value`` the two-sided
        permutation p-value of ``difference`` and ``q_value`` its Benjamini-Hochberg adjustment;
        ``permutations_used`` counts permutations, ``target_prompts`` and ``reference_prompts``
        count prompts (the same on every row).
    """
    import numpy as np
    import pandas as pd

    rates, selections, token_counts, labels, features = _prompt_rates(tables, tag, target, reference, tokens)
    weights = _contrast_weights(labels)
    observed = weights @ rates
    in_target = labels == 0
    table = pd.DataFrame(features, columns=["layer", "expert"])
    table["target_rate"] = rates[in_target].mean(axis=0)
    table["reference_rate"] = table["target_rate"] - observed
    table["difference"] = observed
    hits_t, tokens_t = selections[in_target].sum(axis=0), token_counts[in_target].sum()
    hits_r, tokens_r = selections[~in_target].sum(axis=0), token_counts[~in_target].sum()
    table["log_odds"] = np.log((hits_t + pseudo_count) / (tokens_t - hits_t + pseudo_count)) - np.log(
        (hits_r + pseudo_count) / (tokens_r - hits_r + pseudo_count)
    )
    budget = permutation_budget(rates.shape[1]) if permutations == "auto" else int(permutations)
    if budget > 0:
        table["p_value"], table["permutations_used"] = _permutation_p_values(rates, weights, observed, budget, seed, stop_after)
        table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy())
    else:
        table["p_value"] = table["q_value"] = np.nan
        table["permutations_used"] = 0
    table["target_prompts"] = int(in_target.sum())
    table["reference_prompts"] = int((~in_target).sum())
    table = table.sort_values(["difference", "layer", "expert"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
    table.insert(0, "place", np.arange(1, len(table) + 1))
    run = int(table["permutations_used"].max()) if budget else 0
    table.attrs["tokens"] = tokens.describe(tables)
    table.attrs.update(permutations=budget, permutations_run=run, p_floor=1 / (run + 1) if budget else np.nan, stop_after=stop_after)
    return table


def _prompt_rates(
    tables: Trace, tag: str, target: Any, reference: Any | Sequence[Any] | None, tokens: TokenFilter
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-prompt matrices over the chosen groups.

    Returns (rates [P, F], selection counts [P, F], token counts [P], group labels [P] with 0 =
    target and 1.. = reference groups, features [F, 2] = (layer, expert)).
    """
    import numpy as np

    check_tags(tables, [tag], "tag")
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
    predicate = tokens.predicate(tables, "t")
    counted = f" AND {predicate}" if predicate else ""
    prompts = handle.sql(
        f"""
        WITH chosen AS ({chosen})
        SELECT c.prompt_id, c.label, count(t.position) AS tokens
        FROM chosen AS c LEFT JOIN tokens AS t ON t.prompt_id = c.prompt_id{counted}
        GROUP BY ALL ORDER BY c.prompt_id
        """
    ).fetchnumpy()
    labels = np.asarray(prompts["label"], dtype=np.int64)
    if not (labels == 0).any():
        raise ValueError(f"no prompt has {tag} = {target!r}")
    if not (labels > 0).any():
        raise ValueError(f"no reference prompts: no other value of {tag!r} than {target!r} (or none of {reference!r})")
    layers, num_experts = tables.layers, tables.experts
    layer_index = np.full(max(layers) + 1, -1, dtype=np.int64)
    layer_index[layers] = np.arange(len(layers))
    prompt_ids = np.asarray(prompts["prompt_id"])  # sorted by the query
    num_features = len(layers) * num_experts
    files = tables.files("routes") if hasattr(tables, "files") else []
    if files and np.issubdtype(prompt_ids.dtype, np.integer):
        kept = _kept_positions(handle, prompt_ids, predicate) if predicate else None
        selections = _streamed_selections(files, prompt_ids, layer_index, num_experts, kept).astype(np.float64)
    else:
        # all prompts are aggregated and the unchosen ones dropped below: a join restricting the
        # scan to the chosen prompts costs more than the extra groups
        counts = handle.sql(f"SELECT prompt_id, layer, expert, count(*) AS selections FROM {filtered_routes(tables, tokens)} GROUP BY ALL").fetchnumpy()
        rows = _rows_of(prompt_ids, np.asarray(counts["prompt_id"]))
        chosen_rows = rows >= 0
        columns = layer_index[np.asarray(counts["layer"], dtype=np.int64)] * num_experts + np.asarray(counts["expert"], dtype=np.int64)
        selections = np.bincount(
            (rows * num_features + columns)[chosen_rows],
            weights=np.asarray(counts["selections"], dtype=np.float64)[chosen_rows],
            minlength=len(labels) * num_features,
        )
    selections = selections.reshape(len(labels), num_features)
    token_counts = np.asarray(prompts["tokens"], dtype=np.float64)
    rates = selections / np.maximum(token_counts, 1)[:, None]
    features = np.stack([np.repeat(layers, num_experts), np.tile(np.arange(num_experts), len(layers))], axis=1)
    return rates, selections, token_counts, labels, features


def _kept_positions(handle: Any, prompt_ids: np.ndarray, predicate: str) -> np.ndarray | None:
    """[(P + 1) x W] bool, flattened: whether the token at (prompt row, position) is counted, W the
    largest position + 1; a last row of False stands for prompts not chosen. ``None`` when the
    filter keeps every token of the trace (nothing to look up per event)."""
    import numpy as np

    tokens = handle.sql(f"SELECT prompt_id, position, ({predicate}) AS kept FROM tokens AS t").fetchnumpy()
    kept = np.asarray(tokens["kept"], dtype=bool)
    if kept.all():
        return None
    rows = _rows_of(prompt_ids, np.asarray(tokens["prompt_id"]))
    positions = np.asarray(tokens["position"], dtype=np.int64)
    width = int(positions.max(initial=0)) + 1
    mask = np.zeros((prompt_ids.size + 1, width), dtype=bool)
    chosen = (rows >= 0) & kept
    mask[rows[chosen], positions[chosen]] = True
    return mask.reshape(-1)


def _rows_of(prompt_ids: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Row of each ``found`` id in the sorted ``prompt_ids``; -1 for ids not among them."""
    import numpy as np

    rows = np.searchsorted(prompt_ids, found).clip(max=prompt_ids.size - 1)
    return np.where(prompt_ids[rows] == found, rows, -1)


def _streamed_selections(
    files: Sequence[str], prompt_ids: np.ndarray, layer_index: np.ndarray, num_experts: int, kept: np.ndarray | None
) -> np.ndarray:
    """Selection counts [P * F] by a bincount over the routes files, streamed in row batches.

    A per-(prompt, layer, expert) GROUP BY has too many groups for DuckDB's direct-indexed
    aggregation; numpy's bincount over a packed key is ~2.5x faster and, one worker per core
    (numpy releases the GIL), never holds more than a batch of events per worker. Rows of one
    prompt are contiguous in a shard, so ids are mapped to rows once per run, not per event.
    ``kept`` (from :func:`_kept_positions`) drops the events of tokens a token filter does not count.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pyarrow.parquet as pq

    num_features = layer_index[layer_index >= 0].size * num_experts
    width = kept.size // (prompt_ids.size + 1) if kept is not None else 0
    workers = max(1, min(len(files), os.cpu_count() or 1, 8))

    def count(share: Sequence[str]) -> np.ndarray:
        totals = np.zeros(prompt_ids.size * num_features, dtype=np.int64)
        for path in share:
            columns = ["prompt_id", "layer", "expert", *(["position"] if kept is not None else [])]
            batches = pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1 << 21, use_threads=False)
            for batch in batches:
                ids = batch.column(0).to_numpy()
                starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # runs of one prompt
                run_rows = _rows_of(prompt_ids, ids[starts])
                if kept is not None:  # unchosen prompts point at the mask's all-False last row
                    run_rows = np.where(run_rows >= 0, run_rows, prompt_ids.size)
                rows = np.repeat(run_rows, np.diff(np.r_[starts, ids.size]))
                key = rows * num_features + layer_index[batch.column(1).to_numpy()] * num_experts + batch.column(2).to_numpy()
                if kept is None:
                    counted = rows >= 0
                else:  # one flat gather per event: (row, position) -> counted
                    counted = kept[rows * width + batch.column(3).to_numpy()]
                key = key[counted]
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


def permutation_budget(num_features: int, alpha: float = 0.05) -> int:
    """Permutations needed so that BH at level ``alpha`` over ``num_features`` tests can reach
    significance with margin: the smallest p-value a permutation test gives, 1 / (B + 1), must lie
    well below alpha / m, the BH threshold of the best-ranked feature; B = ceil(20 m / alpha)."""
    return math.ceil(20 * num_features / alpha)


def _permutation_p_values(
    rates: np.ndarray, weights: np.ndarray, observed: np.ndarray, permutations: int, seed: int, stop_after: int,
    max_work: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided sequential Monte Carlo p-values (Besag & Clifford 1991) and permutations used per feature.

    Permuting the labels permutes the weights (group sizes are kept). Each feature draws
    permutations until ``stop_after`` permuted |statistics| reach its |observed| (then p = h / L,
    L the permutations it used) or the permutations end (then p = (g + 1) / (L + 1), g its
    exceedances). They end at the budget B = ``permutations``, or earlier once ``max_work``
    multiply-adds were spent. Default W: what the features far from significance cost to stop
    (with uniform p-values, about h (1 + ln(B / h)) permutations each, h = ``stop_after``), plus
    four times what one feature costs at the full budget, 4 P B. Why that bound suffices: the n
    features still running share the floor p = 1 / L with L ~ W / (P n), and BH gives each
    q = p x m / n ~ P m / W, whatever n; with W = 4 P B = 80 P m / 0.05 that is 0.05 / 80. So many
    strong effects stop early, few are taken to the full budget.
    Only the running features are multiplied: memory stays at one batch.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    num_prompts, num_features = rates.shape
    if max_work is None:  # the null features' sequential phase, then 4 features' worth of the full budget
        null_phase = num_features * stop_after * (1 + math.log(max(permutations / stop_after, 1.0)))
        max_work = num_prompts * (4.0 * permutations + null_phase)
    exceed = np.zeros(num_features, dtype=np.int64)
    used = np.zeros(num_features, dtype=np.int64)
    p_values = np.full(num_features, np.nan)
    running = np.arange(num_features)
    threshold = np.abs(observed) - 1e-12  # ties (e.g. rates identical by symmetry) count as exceeding
    done, work = 0, 0.0
    while done < permutations and running.size and work < max_work:
        batch = min(max(64, _PERMUTATION_ELEMENTS // max(running.size, num_prompts)), permutations - done)
        shuffled = rng.permuted(np.broadcast_to(weights, (batch, num_prompts)), axis=1)
        hits = np.abs(shuffled @ rates[:, running]) >= threshold[running]  # [batch, running]
        work += batch * num_prompts * running.size
        reached = exceed[running] + hits.cumsum(axis=0) >= stop_after  # [batch, running]
        stops = reached.any(axis=0)
        stopped = running[stops]
        used[stopped] = done + reached[:, stops].argmax(axis=0) + 1  # L: the permutation of the last exceedance
        p_values[stopped] = stop_after / used[stopped]
        exceed[running] += hits.sum(axis=0)
        done += batch
        running = running[~stops]
        used[running] = done
    p_values[running] = (exceed[running] + 1) / (done + 1)
    return p_values, used


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
    """The ``n`` most target-specific experts of an :func:`ftri_scores` table, counted over all
    layers: its first ``n`` rows (in the table's row order, i.e. by ``difference``) among those whose
    ``difference`` is positive (the target prompts select them more), as {layer: sorted experts}.
    Fewer than ``n`` when fewer are over-used; ``n`` >= 1."""
    from moelens.analysis._specs import first_rows

    return first_rows(table[table["difference"] > 0], n)


def to_spec(table: pd.DataFrame, n: int, *, kind: str = "drop", **options: Any) -> Intervention:
    """An intervention on :func:`top_experts` ``(table, n)``: the ``n`` most target-specific experts
    over all layers (not per layer; MoTE ranks every expert of the model together).

    Kinds:
        ``"drop"`` (default, MoTE's switch-off): the experts stay selected but their output is
            zeroed and the remaining chosen experts are renormalised to the original total; no other
            expert takes the slot (``disable(experts, mode=Drop(renormalize=True))``).
        ``"reroute"``: the experts leave the choice and the next-best expert takes each slot
            (``disable(experts, mode="reroute")``): a different intervention from the paper's.
        ``"force"``: the experts are inserted into every token's selected set (``force(experts)``).

    ``options`` go to the constructor (``tokens``).
    """
    from moelens import interventions
    from moelens.analysis._specs import build, disable_builders

    builders = {**disable_builders(renormalize=True), "force": interventions.force}
    return build(kind, builders, top_experts(table, n), **options)
