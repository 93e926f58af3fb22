"""Causal ground truth on the shipped trained model: experts that fTRI finds for a domain matter
for that domain. Disabling them (2 per layer) must raise the domain's held-out loss clearly more
than disabling random experts does, and more than it raises the other domains' loss."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import moelens
from moelens import analysis
from moelens.collect import CollectOptions, collect
from moelens.evaluation import mean_token_loss
from moelens.hooks.adapters import moe_layers
from moelens.interventions import disable, intervene

PROBES = Path(__file__).resolve().parent.parent / "data" / "probes" / "domains.jsonl"
DOMAINS = ["arith", "de", "python"]
PER_DOMAIN = 24


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    records = [json.loads(line) for line in PROBES.read_text().splitlines()]
    by_domain: dict[str, list[dict]] = {}
    for record in records:
        by_domain.setdefault(record["domain"], []).append(record)
    discovery = [r for rows in by_domain.values() for r in rows[:PER_DOMAIN]]
    held_out = {d: [r["text"] for r in rows[PER_DOMAIN : 2 * PER_DOMAIN]] for d, rows in by_domain.items()}
    root = tmp_path_factory.mktemp("causal")
    (root / "discovery.jsonl").write_text("".join(json.dumps(r) + "\n" for r in discovery))
    store = collect("moelens-tiny", root / "discovery.jsonl", root / "store", CollectOptions(batch_size=32, progress=False))
    return store, held_out


@pytest.mark.slow
@pytest.mark.parametrize("domain", DOMAINS)
def test_ftri_experts_are_causal_for_their_domain(split, domain):
    store, held_out = split
    model, tokenizer = moelens.load("moelens-tiny")
    table = analysis.ftri_scores(store, tag="domain", target=domain, permutations=200)
    top = table.sort_values("difference", ascending=False).groupby("layer").head(2)
    experts = {int(layer): group["expert"].astype(int).tolist() for layer, group in top.groupby("layer")}

    def loss(texts):
        return mean_token_loss(model, tokenizer, texts, batch_size=24)

    base = {d: loss(texts) for d, texts in held_out.items()}
    with intervene(model, disable(experts)):
        increase = {d: loss(texts) / base[d] - 1 for d, texts in held_out.items()}
    own = increase.pop(domain)
    others = sum(increase.values()) / len(increase)
    base_own = base[domain]
    randoms = []
    for seed in range(5):
        rng = random.Random(seed)
        control = {layer.index: rng.sample(range(layer.num_experts), 2) for layer in moe_layers(model)}
        with intervene(model, disable(control)):
            randoms.append(loss(held_out[domain]) / base_own - 1)
    random_mean = sum(randoms) / len(randoms)
    assert own > 2 * random_mean and own > 0.05, f"{domain}: targeted {own:.1%} vs random {random_mean:.1%}"
    assert own > 2 * others, f"{domain}: own {own:.1%} vs the other domains' mean {others:.1%}"
