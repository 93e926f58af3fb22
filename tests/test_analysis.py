"""Store-based analyses against independent ground truth: stores with planted structure, hand-computed values."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import moelens
from moelens import analysis
from moelens.store import Manifest, StoreLayout, write_manifest, write_shard

LAYERS = [1, 2]  # MoE layer ids (layer 0 is dense, as in the tiny models)
EXPERTS = 8
TOP_K = 2


def write_store(root: Path, routes: list[tuple], tokens: list[tuple], prompts: list[dict], *, experts: int = EXPERTS,
                top_k: int = TOP_K, token_ids: list[int] | None = None, special_token_ids: list[int] = ()) -> moelens.store.StoredTrace:
    """A store in the declared schema from plain rows.

    routes: (prompt_id, position, layer, rank, expert, weight); tokens: (prompt_id, position, token, generated).
    """
    layout = StoreLayout(num_layers=max(LAYERS) + 1, num_experts=experts, top_k=top_k, max_positions=1024)
    route_columns = dict(zip(["prompt_id", "position", "layer", "rank", "expert", "weight"], map(list, zip(*routes))))
    route_columns["weight"] = np.asarray(route_columns["weight"], dtype=np.float16)
    token_columns = dict(zip(["prompt_id", "position", "token", "generated"], map(list, zip(*tokens))))
    token_columns["token_id"] = token_ids if token_ids is not None else [0] * len(tokens)
    prompt_table = pa.Table.from_pylist(prompts)
    prompt_table = prompt_table.set_column(0, "prompt_id", prompt_table["prompt_id"].cast(pa.uint32()))
    root.mkdir(parents=True)
    write_shard(
        root,
        0,
        {
            "prompts": prompt_table,
            "tokens": pa.Table.from_pydict(token_columns, schema=layout.tokens_schema()),
            "routes": pa.Table.from_pydict(route_columns, schema=layout.routes_schema()),
        },
    )
    manifest = Manifest(model="synthetic", config_hash="0", family="synthetic", layout=layout, moe_layers=LAYERS, moelens_version="test", transformers_version="test", shards=["shard-000000"],
                        special_token_ids=list(special_token_ids))
    write_manifest(root, manifest)
    return moelens.read_trace(root)


def routed(choices: dict[tuple[int, int, int], list[int]], weights: tuple[float, ...] = (0.75, 0.25)) -> list[tuple]:
    """Routes rows from {(prompt, position, layer): [experts by rank]}."""
    return [(p, pos, layer, rank, e, weights[rank]) for (p, pos, layer), experts in choices.items() for rank, e in enumerate(experts)]


def random_choices(rng: np.random.Generator, lengths: dict[int, int], *, experts: int = EXPERTS, top_k: int = TOP_K) -> dict[tuple[int, int, int], list[int]]:
    return {(p, pos, layer): list(rng.choice(experts, top_k, replace=False)) for p, n in lengths.items() for pos in range(n) for layer in LAYERS}


# --- descriptive statistics ----------------------------------------------------------------------------
@pytest.fixture
def small_store(tmp_path):
    """One prompt of 4 tokens (the last generated); layer 1 sets {0,1},{0,1},{0,2},{0,3}; layer 2 all {4,5}."""
    sets = [[0, 1], [0, 1], [0, 2], [0, 3]]
    choices = {(0, pos, 1): s for pos, s in enumerate(sets)} | {(0, pos, 2): [4, 5] for pos in range(4)}
    rows = routed(choices)
    # layer 2 weights are equal: entropy exactly 1 bit
    rows = [(p, pos, layer, rank, e, 0.5 if layer == 2 else w) for p, pos, layer, rank, e, w in rows]
    tokens = [(0, pos, f"t{pos}", pos == 3) for pos in range(4)]
    return write_store(tmp_path / "small", rows, tokens, [{"prompt_id": 0, "text": "x", "domain": "en"}])


def test_frequency_load_balance_and_entropy_match_hand_computed_values(small_store):
    frequency = analysis.expert_frequency(small_store).set_index(["layer", "expert"])
    assert frequency.loc[(1, 0), "frequency"] == 1.0 and frequency.loc[(1, 1), "frequency"] == 0.5
    assert frequency.loc[(1, 7), "selections"] == 0 and frequency.loc[(1, 0), "tokens"] == 4
    assert frequency.loc[(1, 0), "mean_weight"] == pytest.approx(0.75)
    assert frequency.loc[(1, 0), "share"] == pytest.approx(4 / 8)

    balance = analysis.load_balance(small_store).set_index("layer")
    # layer 1 loads over 8 experts: [4, 2, 1, 1, 0, 0, 0, 0], mean 1
    loads = [4, 2, 1, 1, 0, 0, 0, 0]
    assert balance.loc[1, "cv"] == pytest.approx(math.sqrt(sum((x - 1) ** 2 for x in loads) / 8))
    assert balance.loc[1, "gini"] == pytest.approx(sum(abs(a - b) for a in loads for b in loads) / (2 * 64 * 1))
    assert balance.loc[1, "max_over_mean"] == 4.0
    assert balance.loc[1, "entropy"] == pytest.approx(1.75)  # shares 1/2, 1/4, 1/8, 1/8
    assert balance.loc[2, "entropy"] == pytest.approx(1.0)

    entropy = analysis.token_entropy(small_store).set_index("layer")
    assert entropy.loc[1, "mean_entropy"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), abs=1e-3)
    assert entropy.loc[2, "mean_entropy"] == pytest.approx(1.0) and entropy.loc[2, "tokens"] == 4
    per_token = analysis.token_entropy(small_store, per_token=True)
    assert len(per_token) == 8 and set(per_token.columns) >= {"prompt_id", "position", "layer", "entropy"}


def test_statistics_group_by_position_class_and_tag(small_store):
    frequency = analysis.expert_frequency(small_store, ["domain", "position_class"])
    assert list(frequency.columns[:2]) == ["domain", "position_class"]
    generated = frequency[(frequency.position_class == "generated") & (frequency.layer == 1)].set_index("expert")
    assert generated.loc[3, "frequency"] == 1.0 and generated.loc[1, "frequency"] == 0.0 and generated.loc[0, "tokens"] == 1
    prompt = frequency[(frequency.position_class == "prompt") & (frequency.layer == 1)].set_index("expert")
    assert prompt.loc[1, "selections"] == 1 and prompt.loc[2, "selections"] == 1 and prompt.loc[0, "tokens"] == 2
    assert set(frequency.position_class) == {"first", "prompt", "generated"} and set(frequency.domain) == {"en"}
    assert set(analysis.load_balance(small_store, ["position_class"]).position_class) == {"first", "prompt", "generated"}
    with pytest.raises(ValueError, match="cannot group by.*'colour'"):
        analysis.expert_frequency(small_store, ["colour"])


@pytest.fixture
def random_store(tmp_path):
    rng = np.random.default_rng(3)
    lengths = {0: 7, 1: 5, 2: 9}
    choices = random_choices(rng, lengths, top_k=3)
    rows = routed(choices, weights=(0.5, 0.3, 0.2))
    tokens = [(p, pos, "x", False) for p, n in lengths.items() for pos in range(n)]
    prompts = [{"prompt_id": p, "text": "x", "domain": "ab"[p % 2]} for p in lengths]
    return write_store(tmp_path / "random", rows, tokens, prompts, top_k=3), choices


def test_coactivation_and_transitions_match_a_brute_force_count(random_store):
    store, choices = random_store
    pairs = Counter()
    for (_prompt, _position, layer), experts in choices.items():
        for a, b in itertools.combinations(sorted(experts), 2):
            pairs[(layer, a, b)] += 1
    got = analysis.coactivation(store)
    assert dict(zip(zip(got.layer, got.expert_a, got.expert_b), got["tokens"])) == pairs

    steps = Counter()
    for (p, pos, layer), experts in choices.items():
        if layer == 1:
            for a, b in itertools.product(experts, choices[(p, pos, 2)]):
                steps[(a, b)] += 1
    moves = analysis.transitions(store)
    assert set(moves.layer) == {1} and set(moves.next_layer) == {2}
    assert dict(zip(zip(moves.expert, moves.next_expert), moves["tokens"])) == steps
    top1 = analysis.transitions(store, ranks=1)
    assert top1["tokens"].sum() == sum(1 for key in choices if key[2] == 1)

    by_domain = analysis.coactivation(store, ["domain"])
    assert by_domain["tokens"].sum() == got["tokens"].sum() and set(by_domain.domain) == {"a", "b"}


def test_stability_counts_the_tokens_whose_expert_set_changed(tmp_path):
    rng = np.random.default_rng(0)
    lengths = {p: 10 for p in range(4)}
    base = random_choices(rng, lengths)
    tokens = [(p, pos, "x", False) for p, n in lengths.items() for pos in range(n)]
    prompts = [{"prompt_id": p, "text": "x", "domain": "ab"[p % 2]} for p in lengths]
    changed = {(p, pos, 1) for p in range(4) for pos in range(3)}  # 12 of 40 tokens at layer 1
    other = {}
    for key, experts in base.items():
        if key in changed:
            other[key] = [experts[0], next(e for e in range(EXPERTS) if e not in experts)]
        elif key[2] == 2:
            other[key] = experts[::-1]  # same set, other order: not a change
        else:
            other[key] = experts
    a = write_store(tmp_path / "a", routed(base), tokens, prompts)
    b = write_store(tmp_path / "b", routed(other), tokens, prompts)
    result = analysis.routing_stability(a, b).set_index("layer")
    assert result.loc[1, "changed_tokens"] == 12 and result.loc[1, "changed_fraction"] == pytest.approx(0.3)
    assert result.loc[2, "changed_fraction"] == 0.0 and result.loc[2, "mean_jaccard"] == 1.0
    assert result.loc[1, "mean_jaccard"] == pytest.approx((28 + 12 / 3) / 40)  # a changed pair shares 1 of 3 experts
    assert (result["unmatched_tokens"] == 0).all()
    assert analysis.routing_stability(a, b, ["domain"])["changed_tokens"].sum() == 12


# --- fTRI ---------------------------------------------------------------------------------------------
@pytest.fixture
def planted_domains(tmp_path):
    """12 prompts per domain a/b/c; layer 2 expert 5 leads every token of domain a and is never chosen elsewhere."""
    rng = np.random.default_rng(1)
    domains = {p: "abc"[p % 3] for p in range(36)}
    lengths = {p: int(rng.integers(6, 12)) for p in domains}
    choices = {}
    for p, pos, layer in ((p, pos, layer) for p, n in lengths.items() for pos in range(n) for layer in LAYERS):
        pool = [e for e in range(EXPERTS) if e != 5 or layer != 2]
        experts = list(rng.choice(pool, TOP_K, replace=False))
        if layer == 2 and domains[p] == "a":
            experts = [5, experts[0]]
        choices[(p, pos, layer)] = experts
    tokens = [(p, pos, "x", False) for p, n in lengths.items() for pos in range(n)]
    prompts = [{"prompt_id": p, "text": "x", "domain": d} for p, d in domains.items()]
    return write_store(tmp_path / "domains", routed(choices), tokens, prompts), choices, domains, lengths


def test_ftri_ranks_the_planted_expert_first_with_a_small_adjusted_p(planted_domains):
    store, *_ = planted_domains
    table = analysis.ftri_scores(store, "domain", "a", permutations=999, seed=0)
    top = table.iloc[0]
    assert (top.layer, top.expert, top["place"]) == (2, 5, 1)
    assert top.target_rate == 1.0 and top.reference_rate == 0.0 and top.difference == 1.0
    assert top.log_odds > 5 and top.p_value == pytest.approx(1 / 1000) and top.q_value < 0.02
    # layer 1 is random everywhere; (layer 2 is not: domain a has one free slot there, the others two)
    assert (table[table.layer == 1].q_value > 0.05).mean() > 0.7
    assert len(table) == len(LAYERS) * EXPERTS and table.target_prompts.iloc[0] == 12 and table.reference_prompts.iloc[0] == 24

    against_a = analysis.ftri_scores(store, "domain", "b", permutations=199)
    last = against_a.iloc[-1]
    assert (last.layer, last.expert) == (2, 5) and last.difference < 0 and last.log_odds < 0


def test_ftri_rates_are_per_prompt_means_and_reference_groups_weigh_equally(planted_domains):
    store, choices, domains, lengths = planted_domains
    table = analysis.ftri_scores(store, "domain", "b", reference=["a", "c"], permutations=0).set_index(["layer", "expert"])

    def group_mean(domain: str, layer: int, expert: int) -> float:
        rates = [sum(expert in choices[(p, pos, layer)] for pos in range(n)) / n for p, n in lengths.items() if domains[p] == domain]
        return sum(rates) / len(rates)

    for layer, expert in [(1, 0), (2, 5), (2, 3)]:
        row = table.loc[(layer, expert)]
        assert row.target_rate == pytest.approx(group_mean("b", layer, expert))
        assert row.reference_rate == pytest.approx((group_mean("a", layer, expert) + group_mean("c", layer, expert)) / 2)
    assert table.p_value.isna().all()
    only_c = analysis.ftri_scores(store, "domain", "b", reference="c", permutations=0)
    assert only_c.reference_prompts.iloc[0] == 12
    with pytest.raises(ValueError, match="no prompt has domain = 'z'"):
        analysis.ftri_scores(store, "domain", "z")


def test_benjamini_hochberg_matches_the_step_up_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    # sorted 0.01, 0.03, 0.04, 0.2 -> p*m/i = 0.04, 0.06, 0.0533, 0.2 -> running minimum from the top
    expected = np.array([0.04, 0.0533333, 0.0533333, 0.2, np.nan])
    np.testing.assert_allclose(analysis.benjamini_hochberg(p), expected, rtol=1e-5)


# --- nPMI ---------------------------------------------------------------------------------------------
@pytest.fixture
def marker_store(tmp_path):
    """40 tokens over 2 prompts; 5 are <think>, 3 are </think>. Layer 1: expert 3 at every <think> and 5 other
    tokens; expert 6 never with <think>; expert 7 at every </think> and nowhere else."""
    think = {(0, 2), (0, 9), (1, 1), (1, 5), (1, 12)}
    close = {(0, 15), (1, 18), (0, 4)}
    also_three = {(0, 0), (0, 1), (1, 0), (1, 3), (1, 19)}
    choices = {}
    for p, pos in itertools.product(range(2), range(20)):
        first = 3 if (p, pos) in think | also_three else 7 if (p, pos) in close else 6 if pos % 2 else 0
        choices[(p, pos, 1)] = [first, 1]
        choices[(p, pos, 2)] = [2, 4]
    token = lambda p, pos: "<think>" if (p, pos) in think else "</think>" if (p, pos) in close else f"w{pos}"  # noqa: E731
    tokens = [(p, pos, token(p, pos), False) for p, pos in itertools.product(range(2), range(20))]
    prompts = [{"prompt_id": 0, "text": "x", "domain": "math"}, {"prompt_id": 1, "text": "y", "domain": "code"}]
    return write_store(tmp_path / "markers", routed(choices), tokens, prompts)


def test_npmi_of_a_planted_expert_equals_the_hand_computed_value(marker_store):
    table = analysis.npmi_scores(marker_store, markers=["<think>"], min_count=0).set_index(["layer", "expert"])
    # expert 3 of layer 1: joint 5, expert 10, condition 5, T = 40 -> log(4) / log(8) = 2/3
    row = table.loc[(1, 3)]
    assert (row.joint_tokens, row.expert_tokens, row.condition_tokens, row.tokens) == (5, 10, 5, 40)
    assert row.npmi == pytest.approx(math.log((5 / 40) / ((10 / 40) * (5 / 40))) / -math.log(5 / 40))
    assert row.npmi == pytest.approx(2 / 3)
    assert table.loc[(1, 6), "npmi"] == -1.0  # never together
    assert table.loc[(2, 2), "npmi"] == pytest.approx(0.0)  # always selected: independent of everything
    ranked = analysis.npmi_scores(marker_store, markers=["<think>"], min_count=5)
    assert (ranked.iloc[0].layer, ranked.iloc[0].expert) == (1, 3) and (ranked.joint_tokens >= 5).all()
    by_regex = analysis.npmi_scores(marker_store, regex="^<think>$", min_count=0).set_index(["layer", "expert"])
    assert by_regex.loc[(1, 3), "npmi"] == row.npmi


def test_npmi_edge_cases_and_tag_condition(marker_store):
    from moelens.analysis.npmi import npmi_from_counts

    assert npmi_from_counts(10, 10, 10, 10) == 1.0  # p(x,y) = 1
    assert npmi_from_counts(0, 3, 4, 10) == -1.0
    assert npmi_from_counts(5, 5, 5, 10) == pytest.approx(1.0)  # x iff y
    by_tag = analysis.npmi_scores(marker_store, where={"domain": "math"}, min_count=0).set_index(["layer", "expert"])
    # condition = the 20 tokens of prompt 0; expert 3 of layer 1 is chosen at 2 + 2 = 4 of them, 10 overall
    row = by_tag.loc[(1, 3)]
    assert (row.joint_tokens, row.condition_tokens) == (4, 20)
    assert row.npmi == pytest.approx(math.log((4 / 40) / ((10 / 40) * (20 / 40))) / -math.log(4 / 40))
    with pytest.raises(ValueError, match="exactly one condition"):
        analysis.npmi_scores(marker_store, markers=["<think>"], regex="x")


def test_combined_npmi_sums_signed_scores(marker_store):
    table = analysis.npmi_combined(marker_store, ["+<think>", "-</think>"], min_count=0).set_index(["layer", "expert"])
    single = {m: analysis.npmi_scores(marker_store, markers=[m], min_count=0).set_index(["layer", "expert"]) for m in ("<think>", "</think>")}
    for key in [(1, 3), (1, 7), (1, 1)]:
        assert table.loc[key, "score"] == pytest.approx(single["<think>"].loc[key, "npmi"] - single["</think>"].loc[key, "npmi"])
        assert table.loc[key, "joint_tokens[</think>]"] == single["</think>"].loc[key, "joint_tokens"]
    assert table.loc[(1, 7), "npmi[</think>]"] == pytest.approx(1.0)  # chosen exactly at </think>
    supported = analysis.npmi_combined(marker_store, ["<think>", "-</think>"], min_count=5)
    assert list(zip(supported.layer, supported.expert))[0] == (1, 3) and (supported["joint_tokens[<think>]"] >= 5).all()


# --- figures, specs, CLI, API ---------------------------------------------------------------------------
def test_figures_embed_plotly_and_hold_the_expected_traces(marker_store, tmp_path):
    table = analysis.npmi_scores(marker_store, markers=["<think>"], min_count=0)
    figures = {
        "heatmap": (analysis.heatmap(table, "npmi"), "heatmap"),
        "bars": (analysis.ranked_bars(table, "npmi", n=5), "bar"),
        "pairs": (analysis.coactivation_matrix(analysis.coactivation(marker_store), 1, num_experts=EXPERTS), "heatmap"),
        "tokens": (analysis.token_view(marker_store, 0, 1, tokens_per_line=8), "heatmap"),
    }
    for name, (figure, kind) in figures.items():
        assert [trace.type for trace in figure.data] == [kind], name
        text = analysis.write_html(figure, tmp_path / f"{name}.html").read_text()
        # offline by default, plotly.js once beside the files rather than 4.8 MB in each
        assert '<script src="http' not in text and 'src="plotly.min.js"' in text and len(text) < 100_000, name
    assert "plotly.js v" in (tmp_path / "plotly.min.js").read_text()
    inline = analysis.write_html(figures["bars"][0], tmp_path / "inline" / "bars.html", plotlyjs="inline").read_text()
    assert "plotly.js v" in inline and len(inline) > 1_000_000 and not (tmp_path / "inline" / "plotly.min.js").exists()
    heat = figures["heatmap"][0].data[0]
    assert np.asarray(heat.z).shape == (2, EXPERTS) and heat.z[0][3] == pytest.approx(2 / 3)
    assert len(figures["bars"][0].data[0].y) == 5
    pairs = np.asarray(figures["pairs"][0].data[0].z)
    assert (pairs == pairs.T).all() and pairs[1, 3] == 10
    view = figures["tokens"][0].data[0]
    assert np.asarray(view.z).shape == (3, 8) and int(view.z[0][2]) == 3  # token 2 of prompt 0 (<think>) leads with expert 3 (z in [e, e + 1): expert e)
    assert view.text[0][2] == "&lt;think&gt;" and "L1: e3 0.750, e1 0.250<br>L2: e2 0.750, e4 0.250" in view.hovertext[0][2]


def test_top_experts_become_intervention_specs(planted_domains, marker_store):
    from moelens.interventions import Drop, disable, reweight

    store, *_ = planted_domains
    table = analysis.ftri_scores(store, "domain", "a", permutations=0)
    disabled = analysis.ftri_spec(table, 1, kind="reroute").to_dict()
    forced = analysis.ftri_spec(table, 3, kind="force").to_dict()
    assert disabled == disable({2: [5]}).to_dict() and disabled != forced
    npmi_table = analysis.npmi_scores(marker_store, markers=["<think>"], min_count=5)
    spec = analysis.npmi_spec(npmi_table, 1, factor=64.0, renormalize=True)
    assert spec.to_dict() == reweight({1: [3]}, 64.0, renormalize=True).to_dict()
    # the default is MoTE's switch-off: zero weight, renormalise the rest, no refill
    assert analysis.ftri_spec(table, 1).to_dict() == disable({2: [5]}, mode=Drop(renormalize=True)).to_dict()
    with pytest.raises(ValueError, match="kind must be one of"):
        analysis.ftri_spec(table, 1, kind="boost")


def test_every_analysis_has_the_same_spec_helpers(planted_domains, marker_store):
    """One vocabulary: ``top_experts(result, n)`` -> {layer: sorted experts}, ``to_spec(result, n, *, kind)``."""
    import inspect

    from moelens.analysis import easy_ep, ftri, npmi, super_experts
    from moelens.interventions import Drop, disable

    for module in (ftri, npmi, easy_ep, super_experts):
        parameters = list(inspect.signature(module.to_spec).parameters.values())
        assert [p.name for p in parameters[1:3]] == ["n", "kind"], module.__name__
        assert parameters[2].kind is inspect.Parameter.KEYWORD_ONLY
        assert list(inspect.signature(module.top_experts).parameters)[1] == "n"
    assert analysis.ftri_top_experts is ftri.top_experts and analysis.npmi_top_experts is npmi.top_experts
    store, *_ = planted_domains
    table = analysis.ftri_scores(store, "domain", "a", permutations=0)
    assert analysis.ftri_top_experts(table, 1) == {2: [5]}
    npmi_table = analysis.npmi_scores(marker_store, markers=["<think>"], min_count=0)
    top = analysis.npmi_top_experts(npmi_table, 3)  # n counts over all layers, experts sorted in each layer
    assert sum(map(len, top.values())) == 3 and all(experts == sorted(experts) for experts in top.values())
    assert analysis.npmi_spec(npmi_table, 1, kind="drop").to_dict() == disable({1: [3]}, mode=Drop()).to_dict()
    with pytest.raises(ValueError, match="factor applies to kind='reweight' only"):
        analysis.npmi_spec(npmi_table, 1, kind="drop", factor=8.0)
    with pytest.raises(ValueError, match="renormalize does not apply"):
        analysis.npmi_spec(npmi_table, 1, kind="reroute", renormalize=True)
    with pytest.raises(ValueError, match="'switch_off' is now called 'drop'"):
        analysis.ftri_spec(table, 1, kind="switch_off")
    with pytest.raises(ValueError, match="n must be a whole number >= 1"):
        analysis.npmi_top_experts(npmi_table, 0)


def _analyze(argv: list[str]) -> int:
    from moelens.analysis.cli import add_analyze_parser, run_analyze

    parser = argparse.ArgumentParser(prog="moelens")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    return run_analyze(parser.parse_args(argv))


@pytest.mark.parametrize(
    "argv, files",
    [
        (["stats", "--by", "domain", "--by", "position_class"], ["frequency.csv", "load_balance.csv", "token_entropy.csv", "coactivation.csv", "transitions.csv", "frequency.html", "coactivation_layer1.html"]),
        (["ftri", "--tag", "domain", "--target", "math", "--permutations", "50", "--spec", "2"], ["ftri.csv", "ftri_heatmap.html", "ftri_top.html", "spec.json"]),
        (["npmi", "--marker", "+<think>", "--marker=-</think>", "--min-count", "1"], ["npmi.csv", "npmi_heatmap.html", "npmi_top.html"]),
        (["npmi", "--where", "domain=code", "--spec", "1", "--factor", "8"], ["npmi.csv", "spec.json"]),
    ],
    ids=["stats", "ftri", "npmi-markers", "npmi-tag"],
)
def test_cli_writes_tables_and_figures(marker_store, tmp_path, argv, files, capsys):
    out = tmp_path / "out"
    assert _analyze(["analyze", argv[0], str(marker_store.root), "--out", str(out), *argv[1:]]) == 0
    for name in files:
        assert (out / name).is_file(), name
    assert str(out / files[0]) in capsys.readouterr().out
    table = pd.read_csv(out / files[0])
    assert len(table) > 0


def test_stats_work_on_an_in_memory_trace_like_on_its_store(tmp_path, capsys):
    import torch

    from moelens.cli import main

    texts = ["The quick brown fox", "def add(a, b): return a + b"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in zip(texts, ["en", "code"])))
    assert main(["collect", "tiny:qwen2_moe", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    model, tokenizer = moelens.load("tiny:qwen2_moe")
    with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as tracer:
        for text in texts:
            model(**tokenizer([text], return_tensors="pt"))
    stored = moelens.read_trace(tmp_path / "s")
    pd.testing.assert_frame_equal(analysis.expert_frequency(tracer), analysis.expert_frequency(stored), check_dtype=False)
    assert analysis.routing_stability(tracer, stored)["changed_tokens"].sum() == 0
    assert len(analysis.token_view(tracer, 0, 1).data) == 1
    with pytest.raises(ValueError, match="no prompt tags"):
        analysis.expert_frequency(tracer, ["domain"])


def test_importing_the_analysis_module_is_cheap():
    code = "import sys, moelens.analysis as a; heavy = {'pandas', 'duckdb', 'plotly', 'numpy'} & set(sys.modules); assert not heavy, heavy; assert callable(a.npmi_scores)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ftri_permutation_budget_lets_q_values_reach_significance_at_model_scale():
    """6,144 features (Qwen3-30B-A3B: 48 layers x 128 experts), 40 prompts, one planted feature.
    A fixed 1000 permutations cannot make it significant there (its p >= 1 / 1001, x m = 6.1); the automatic
    budget gives the planted feature q < 0.05, and the null features' p-values stay valid."""
    from moelens.analysis.ftri import _contrast_weights, _permutation_p_values, benjamini_hochberg, permutation_budget

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    rates = rng.uniform(0, 0.1, size=(40, 6144))
    rates[:20, 7] += 0.5  # planted: the target prompts select feature 7 far more often
    weights = _contrast_weights(labels)
    observed = weights @ rates
    fixed, _ = _permutation_p_values(rates, weights, observed, 1000, 0, stop_after=10)
    assert benjamini_hochberg(fixed)[7] > 0.3  # far from significant, however strong the signal
    budget = permutation_budget(6144)
    assert budget == 2_457_600
    p, used = _permutation_p_values(rates, weights, observed, budget, 0, stop_after=10)
    q = benjamini_hochberg(p)
    assert q[7] < 0.05 and used[7] > budget / 2 and p[7] == 1 / (used[7] + 1)  # never exceeded: at its floor
    null = np.delete(p, 7)
    assert 0.03 < (null <= 0.05).mean() < 0.07 and 0.08 < (null <= 0.1).mean() < 0.12  # uniform under the null
    assert np.median(np.delete(used, 7)) < 100  # null features stop early
    assert np.mean(null) == pytest.approx(0.5, abs=0.03)
    # a moderate planted effect: its sequential p-value agrees with a plain 200,000-permutation estimate
    rates[:20, 11] += 0.04
    observed = weights @ rates
    p, _ = _permutation_p_values(rates, weights, observed, budget, 1, stop_after=10)
    shuffled = np.stack([rng.permutation(weights) for _ in range(200_000)])
    plain = np.mean(np.abs(shuffled @ rates[:, 11]) >= abs(observed[11]))
    assert 1e-4 < plain < 1e-2 and p[11] == pytest.approx(plain, rel=0.7)


def test_ftri_permutations_stop_at_the_work_cap_when_many_effects_are_strong():
    """300 strong features of 6,144: the test stops early (work cap), their shared floor is small
    next to m / rank, so BH still calls every one of them, with few null features among them."""
    from moelens.analysis.ftri import _contrast_weights, _permutation_p_values, benjamini_hochberg, permutation_budget

    rng = np.random.default_rng(1)
    rates = rng.uniform(0, 0.1, size=(40, 6144))
    strong = rng.choice(6144, 300, replace=False)
    rates[:20, strong[:, None]] += 0.5
    weights = _contrast_weights(np.repeat([0, 1], 20))
    p, used = _permutation_p_values(rates, weights, weights @ rates, permutation_budget(6144), 0, 10, max_work=2e9)
    run = used.max()
    assert run < permutation_budget(6144) and (used[strong] == run).all() and (p[strong] == 1 / (run + 1)).all()
    q = benjamini_hochberg(p)
    false = (np.delete(q, strong) < 0.05).sum()
    assert (q[strong] < 0.05).all() and false / (false + len(strong)) < 0.1  # BH: 5% false discoveries expected


def test_the_token_filter_keeps_bos_and_generated_tokens_out_of_ftri_and_npmi(tmp_path):
    """Planted: target prompts' generated tokens (their answers) all use expert 6 in layer 2, and
    every BOS (special id 1) uses expert 7; the prompt text routes identically in both groups,
    except expert 3, which the target's prompt tokens use more. fTRI over prompt tokens without
    specials (MoTE's default) finds expert 3 and never 6 or 7; counting every token finds 6."""
    rng = np.random.default_rng(3)
    choices, tokens, token_ids, prompts = {}, [], [], []
    for p in range(24):
        target = p < 12
        prompts.append({"prompt_id": p, "text": "x", "domain": "t" if target else "r"})
        generated = 6 if target else 2
        for pos in range(10 + generated):
            is_bos, is_generated = pos == 0, pos >= 10
            for layer in LAYERS:
                if is_bos:
                    experts = [7, 0]
                elif is_generated and target and layer == 2:
                    experts = [6, 0]
                elif layer == 2 and target and pos in (3, 4, 5):
                    experts = [3, 1]
                else:
                    experts = list(rng.choice([0, 1, 2, 4, 5], 2, replace=False))
                choices[(p, pos, layer)] = experts
            tokens.append((p, pos, "<bos>" if is_bos else f"w{pos}", is_generated))
            token_ids.append(1 if is_bos else 10 + pos)
    store = write_store(tmp_path / "s", routed(choices), tokens, prompts, token_ids=token_ids, special_token_ids=[1])

    default = analysis.ftri_scores(store, "domain", "t", permutations=500)
    assert default.attrs["tokens"] == {"kind": "prompt", "special": "excluded (ids [1])", "positions": None}
    assert (default.iloc[0].layer, default.iloc[0].expert) == (2, 3)
    by_feature = default.set_index(["layer", "expert"])
    # by hand: target prompts count 9 tokens (positions 1-9), 3 of which choose expert 3 in layer 2
    assert by_feature.loc[(2, 3), "target_rate"] == pytest.approx(3 / 9) and by_feature.loc[(2, 3), "reference_rate"] == 0
    assert by_feature.loc[(2, 6), "target_rate"] == 0 and by_feature.loc[(2, 7), "target_rate"] == 0
    everything = analysis.ftri_scores(store, "domain", "t", permutations=0, tokens=analysis.TokenFilter(special=True))
    assert (everything.iloc[0].layer, everything.iloc[0].expert) == (2, 6)
    assert everything.set_index(["layer", "expert"]).loc[(2, 6), "target_rate"] == pytest.approx(6 / 16)

    npmi = analysis.npmi_scores(store, regex="^w1$", min_count=1, tokens=analysis.TokenFilter(kind="prompt"))
    assert npmi["tokens"].iloc[0] == 24 * 9 and npmi.attrs["tokens"]["kind"] == "prompt"
    generated_only = analysis.expert_frequency(store, tokens=analysis.TokenFilter(kind="generated")).set_index(["layer", "expert"])
    assert generated_only.loc[(2, 6), "selections"] == 12 * 6 and generated_only.loc[(2, 6), "tokens"] == 12 * 6 + 12 * 2
    with pytest.raises(ValueError, match="kind='answers'"):
        analysis.TokenFilter(kind="answers")


def test_npmi_interval_by_hand_and_its_coverage():
    """Wilson interval of p(expert | condition), mapped through nPMI; checked by hand, then its
    coverage: independent expert and marker (true nPMI 0), 30 marker tokens, 4000 draws."""
    from moelens.analysis.npmi import npmi_from_counts, npmi_interval

    joint, expert_tokens, condition, tokens = np.array([6.0]), np.array([1000.0]), np.array([30.0]), np.array([10000.0])
    q, z = 6 / 30, 1.96
    center = (q + z * z / 60) / (1 + z * z / 30)
    half = z * math.sqrt(q * (1 - q) / 30 + z * z / 3600) / (1 + z * z / 30)
    expected = [npmi_from_counts(np.array([c * 30]), expert_tokens, condition, tokens)[0] for c in (center - half, center + half)]
    low, high = npmi_interval(joint, expert_tokens, condition, tokens)
    assert (low[0], high[0]) == pytest.approx(tuple(expected))
    assert low[0] < npmi_from_counts(joint, expert_tokens, condition, tokens)[0] < high[0]

    rng = np.random.default_rng(0)
    draws = rng.binomial(30, 0.1, size=4000).astype(np.float64)  # p(expert) = 0.1, independent of the marker
    low, high = npmi_interval(draws, np.full(4000, 1000.0), np.full(4000, 30.0), np.full(4000, 10000.0))
    covered = (low <= 0) & (high >= 0)
    assert 0.92 < covered.mean() < 0.99


def test_ftri_specs_and_marks_take_only_experts_the_target_over_uses(planted_domains):
    store, *_ = planted_domains
    table = analysis.ftri_scores(store, "domain", "a", permutations=0)
    positive = table[table["difference"] > 0]
    assert 0 < len(positive) < len(table)
    from moelens.analysis.ftri import top_experts

    marked = top_experts(table, len(table))  # ask for every row: only the over-used come back
    assert sum(len(e) for e in marked.values()) == len(positive)
    assert {(l, e) for l, es in marked.items() for e in es} == set(zip(positive["layer"], positive["expert"]))
    spec = analysis.ftri_spec(table, len(table)).to_dict()["interventions"][0]
    assert sum(len(v) for v in spec["experts"].values()) == len(positive)
