"""The observation sites own every hook moelens puts on a model: hooks exist only while a client
is attached and only where one needs them; observers compose; the rewrite comes before any
observer; moelens' own probe forward is neither recorded nor steered."""

from __future__ import annotations

import pytest
import torch

import moelens
from moelens.hooks import routing_check
from moelens.hooks.adapters import moe_view
from moelens.interventions import disable, intervene, top_k
from tests.conftest import PROMPTS


def _hook_counts(model) -> dict[str, tuple[int, int]]:
    """module name -> (forward hooks, forward pre-hooks), for modules holding any."""
    counts = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    return {name: c for name, c in counts.items() if c != (0, 0)}


def _routes(model, tokenizer, prompts=PROMPTS[:2]):
    with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as tr:
        model(**tokenizer(prompts, return_tensors="pt", padding=True))
    return tr.routes


def test_hooks_only_where_a_client_needs_them():
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    view = moe_view(model)
    steered, other = view.layers[1], view.layers[0]
    before = _hook_counts(model)
    with intervene(model, disable({steered.index: [0]})):  # one layer, every token: no step bookkeeping
        hooked = set(_hook_counts(model)) - set(before)
        names = {module: name for name, module in model.named_modules()}
        assert hooked == {names[steered.router], names[steered.experts]}
        assert names[other.router] not in hooked and names[view.stack] not in hooked
        with torch.no_grad(), moelens.trace(model):
            assert {names[view.stack], names[other.router], names[other.experts]} <= set(_hook_counts(model))
            model(**tokenizer(PROMPTS[:1], return_tensors="pt"))
        assert set(_hook_counts(model)) - set(before) == hooked  # the tracer's hooks left with it
    assert _hook_counts(model) == before


def test_two_tracers_at_once_record_the_same_routing():
    model, tokenizer = moelens.load("tiny:mixtral")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), moelens.trace(model) as outer:
        with moelens.trace(model) as inner:
            model(**batch)
        model(**batch)  # the outer tracer goes on alone
    alone = _routes(model, tokenizer, PROMPTS)
    assert len(alone) > 0
    assert inner.routes.drop(columns="prompt_id").equals(alone.drop(columns="prompt_id"))
    first = outer.routes[outer.routes.prompt_id < len(PROMPTS)].reset_index(drop=True)
    second = outer.routes[outer.routes.prompt_id >= len(PROMPTS)].reset_index(drop=True)
    assert first.drop(columns="prompt_id").equals(second.drop(columns="prompt_id"))
    assert first.drop(columns="prompt_id").equals(alone.drop(columns="prompt_id"))


def test_the_routing_check_probe_is_neither_recorded_nor_steered():
    """A routing check run while a tracer and an intervention are active (a fresh check_rule
    calls the MoE blocks itself) sees the family's own routing, and the tracer records only the
    user's forward call."""
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    check = routing_check.routing_check(model)
    layer = moe_view(model).layers[0]
    rule = check.layers[layer.index].rule
    assert rule is not None and check_problem(model, rule) is None
    spec = top_k(1) + disable({layer.index: list(range(layer.num_experts // 2))})
    with intervene(model, spec), moelens.trace(model, tokenizer=tokenizer) as tr:
        assert check_problem(model, rule) is None
        with torch.no_grad():
            model(**tokenizer(PROMPTS[:1], return_tensors="pt"))
    assert tr.prompts.prompt_id.tolist() == [0]
    steered = tr.routes[tr.routes.layer == layer.index]
    assert len(steered) > 0 and steered.expert.min() >= layer.num_experts // 2 and steered["rank"].max() == 0


def check_problem(model, rule):
    return routing_check.check_rule(model, rule).layers[moe_view(model).layers[0].index].problem


def test_experts_run_without_their_router_is_an_error():
    model, _ = moelens.load("tiny:mixtral")
    layer = moe_view(model).layers[0]
    hidden = torch.zeros(3, model.config.hidden_size)
    index = torch.zeros(3, layer.top_k, dtype=torch.long)
    weights = torch.full((3, layer.top_k), 1.0 / layer.top_k)
    with pytest.raises(moelens.UnsupportedModelError, match=f"layer {layer.index}: the experts ran but the router"), moelens.trace(model):
        layer.experts(hidden, index, weights)
