"""Analysis throughput: routing events per second for frequency, fTRI and nPMI, moelens vs a pandas groupby.

    python benchmarks/analysis_throughput.py [--events 1e8] [--pandas-events 5e6] [--keep DIR]

Writes a synthetic trace store (48 MoE layers x 64 experts x top-8, prompts of 256 tokens in 4
domains, 1% ``<think>`` marker tokens) shard by shard with the store's own writer, so it never
holds the trace in memory. Then, in one run on the same store:

Times are the best of 3 calls (pandas: 2).

- moelens: ``expert_frequency``, ``ftri_scores`` (aggregation; the permutation test is timed on its
  own since its cost does not grow with the events) and ``npmi_scores``, streamed over the
  Parquet files (DuckDB; fTRI's per-prompt counts by a threaded numpy bincount); events/s = all
  events of the store / wall time.
- pandas: the straightforward groupby of each analysis on a subsample that fits memory (the first
  shards, ``--pandas-events`` events), reading included like for moelens; scaled to events/s.

The target is >= 50M events/s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import moelens
from moelens import analysis
from moelens.store import Manifest, StoreLayout, widen_half_floats, write_manifest, write_shard

LAYERS, EXPERTS, TOP_K = 48, 64, 8
PROMPT_TOKENS, PROMPTS_PER_SHARD = 256, 64
DOMAINS = ["code", "math", "en", "fr"]
MARKER, MARKER_RATE, VOCABULARY = "<think>", 0.01, 5000


def write_synthetic_store(root: Path, events: int, seed: int = 0) -> int:
    """Write a store of about ``events`` routing events (whole prompts); returns the exact number."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    layout = StoreLayout(num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, max_positions=PROMPT_TOKENS)
    # each domain prefers its own experts per layer: a skewed, domain-dependent load like a real model
    preference = rng.dirichlet(np.full(EXPERTS, 0.3), size=(len(DOMAINS), LAYERS))
    shifted_cdf = (np.cumsum(preference, axis=-1) + np.arange(len(DOMAINS) * LAYERS).reshape(len(DOMAINS), LAYERS, 1)).reshape(-1)
    vocabulary = np.array([f"w{i}" for i in range(VOCABULARY)] + [MARKER], dtype=object)
    events_per_prompt = PROMPT_TOKENS * LAYERS * TOP_K
    prompts = max(1, round(events / events_per_prompt))
    for shard, first in enumerate(range(0, prompts, PROMPTS_PER_SHARD)):
        ids = np.arange(first, min(first + PROMPTS_PER_SHARD, prompts))
        domains = ids % len(DOMAINS)
        tokens = ids.size * PROMPT_TOKENS
        token_prompt = np.repeat(ids, PROMPT_TOKENS)
        token_position = np.tile(np.arange(PROMPT_TOKENS), ids.size)
        # one (token, layer) row per decision: experts base + r * odd stride (mod 64) are always distinct
        decision_domain = np.repeat(np.repeat(domains, PROMPT_TOKENS), LAYERS)
        decision_layer = np.tile(np.arange(LAYERS), tokens)
        # inverse-CDF sampling of all rows at once: row r's CDF shifted by r makes one increasing array
        row = decision_domain * LAYERS + decision_layer
        drawn = np.searchsorted(shifted_cdf, row + rng.random(tokens * LAYERS) * (1 - 1e-9))
        base = (drawn - row * EXPERTS).clip(0, EXPERTS - 1)
        stride = 2 * rng.integers(0, EXPERTS // 2, tokens * LAYERS) + 1
        experts = (base[:, None] + np.arange(TOP_K) * stride[:, None]) % EXPERTS
        weights = np.exp(-0.4 * np.arange(TOP_K))[None, :] * rng.uniform(0.5, 1.0, (tokens * LAYERS, 1))
        weights /= weights.sum(axis=1, keepdims=True)
        routes = pa.Table.from_pydict(
            {
                "prompt_id": np.repeat(token_prompt, LAYERS * TOP_K).astype(np.uint32),
                "position": np.repeat(token_position, LAYERS * TOP_K).astype(np.uint16),
                "layer": np.repeat(decision_layer, TOP_K).astype(np.uint8),
                "rank": np.tile(np.arange(TOP_K), tokens * LAYERS).astype(np.uint8),
                "expert": experts.reshape(-1).astype(np.uint8),
                "weight": weights.reshape(-1).astype(np.float16),
            },
            schema=layout.routes_schema(),
        )
        token_ids = np.where(rng.random(tokens) < MARKER_RATE, VOCABULARY, rng.integers(0, VOCABULARY, tokens))
        token_table = pa.Table.from_pydict(
            {
                "prompt_id": token_prompt.astype(np.uint32),
                "position": token_position.astype(np.uint16),
                "token_id": token_ids.astype(np.uint32),
                "token": vocabulary[token_ids],
                "generated": token_position >= PROMPT_TOKENS - 32,
            },
            schema=layout.tokens_schema(),
        )
        prompt_table = pa.table(
            {"prompt_id": pa.array(ids, pa.uint32()), "text": [f"prompt {i}" for i in ids], "domain": [DOMAINS[d] for d in domains]}
        )
        write_shard(root, shard, {"prompts": prompt_table, "tokens": token_table, "routes": routes})
    manifest = Manifest(
        model="synthetic",
        config_hash="synthetic",
        family="synthetic",
        layout=layout,
        moe_layers=list(range(LAYERS)),
        moelens_version=moelens.__version__,
        transformers_version="none",
        shards=[f"shard-{i:06d}" for i in range(shard + 1)],
    )
    write_manifest(root, manifest)
    return prompts * events_per_prompt


def pandas_frequency(routes: pd.DataFrame, tokens: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    return routes.groupby(["layer", "expert"]).agg(selections=("weight", "size"), mean_weight=("weight", "mean"))


def pandas_ftri(routes: pd.DataFrame, tokens: pd.DataFrame, prompts: pd.DataFrame) -> pd.Series:
    counts = routes.groupby(["prompt_id", "layer", "expert"]).size().rename("selections").reset_index()
    counts = counts.merge(tokens.groupby("prompt_id").size().rename("tokens").reset_index(), on="prompt_id")
    counts = counts.merge(prompts[["prompt_id", "domain"]], on="prompt_id")
    counts["rate"] = counts["selections"] / counts["tokens"]
    means = counts.groupby(["domain", "layer", "expert"])["rate"].sum() / prompts.groupby("domain").size()
    means = means.unstack("domain")
    return means[DOMAINS[0]] - means[DOMAINS[1:]].mean(axis=1)


def pandas_npmi(routes: pd.DataFrame, tokens: pd.DataFrame, prompts: pd.DataFrame) -> pd.Series:
    marked = tokens.loc[tokens["token"] == MARKER, ["prompt_id", "position"]].assign(marked=True)
    joined = routes[["prompt_id", "position", "layer", "expert"]].merge(marked, on=["prompt_id", "position"], how="left")
    joined["marked"] = joined["marked"].fillna(False).astype(bool)
    counts = joined.groupby(["layer", "expert"])["marked"].agg(expert_tokens="size", joint_tokens="sum")
    total, condition = len(tokens), len(marked)
    p_joint = counts["joint_tokens"] / total
    with np.errstate(divide="ignore"):  # experts never seen with the marker: log 0, as in nPMI's -1 case
        return np.log(p_joint / (counts["expert_tokens"] / total * condition / total)) / -np.log(p_joint)


def timed(function: Callable[[], Any], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls (the first call also pays for reading the Parquet footers)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=float, default=1e8, help="routing events in the synthetic store")
    parser.add_argument("--pandas-events", type=float, default=5e6, help="events of the pandas subsample")
    parser.add_argument("--permutations", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="fTRI permutation budget, a number or auto (timed separately)")
    parser.add_argument("--keep", type=Path, help="write the store here and keep it (default: a temporary directory)")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="moelens-bench-")) / "store"
    try:
        if not (root / "manifest.json").exists():
            start = time.perf_counter()
            write_synthetic_store(root, int(args.events))
            print(f"wrote {root} in {time.perf_counter() - start:.1f}s")
        store = moelens.read_trace(root)
        events = sum(pq.ParquetFile(path).metadata.num_rows for path in store.files("routes"))
        size = sum(os.path.getsize(path) for path in store.files("routes"))
        print(f"store: {events:,} routing events, {len(store.shards)} shards, {size / events:.2f} bytes/event, {os.cpu_count()} cores")

        moelens_seconds = {
            "frequency": timed(lambda: analysis.expert_frequency(store)),
            "fTRI": timed(lambda: analysis.ftri_scores(store, "domain", DOMAINS[0], permutations=0)),
            "nPMI": timed(lambda: analysis.npmi_scores(store, markers=[MARKER])),
        }
        with_test_seconds = timed(lambda: analysis.ftri_scores(store, "domain", DOMAINS[0], permutations=args.permutations))

        # pandas: whole shards from the start until the subsample size is reached, read inside the timing
        files, sample_events = [], 0
        for path in store.files("routes"):
            if sample_events >= args.pandas_events and files:
                break
            files.append(path)
            sample_events += pq.ParquetFile(path).metadata.num_rows
        names = [Path(path).name for path in files]

        def read(table: str) -> pd.DataFrame:
            return widen_half_floats(pq.ParquetDataset([str(root / table / name) for name in names]).read()).to_pandas()

        implementations = {"frequency": pandas_frequency, "fTRI": pandas_ftri, "nPMI": pandas_npmi}
        pandas_seconds = {name: timed(lambda f=f: f(read("routes"), read("tokens"), read("prompts")), repeats=2) for name, f in implementations.items()}

        print(f"\n{'analysis':<10} {'moelens':>22} {'pandas groupby':>22} {'speed-up':>9}")
        for name in implementations:
            ours = events / moelens_seconds[name]
            theirs = sample_events / pandas_seconds[name]
            print(f"{name:<10} {ours / 1e6:>10.1f} M events/s ({moelens_seconds[name]:5.2f}s) {theirs / 1e6:>8.1f} M events/s ({pandas_seconds[name]:5.2f}s) {ours / theirs:>8.1f}x")
        print(f"fTRI with its permutation test ({args.permutations} permutations): {events / with_test_seconds / 1e6:.1f} M events/s ({with_test_seconds:.2f}s)")
        print(f"pandas ran on the first {sample_events:,} events")
    finally:
        if args.keep is None:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
