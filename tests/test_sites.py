"""The observation sites own every hook moelens puts on a model: hooks exist only while a client
is attached and only where one needs them; observers compose; the rewrite comes before any
observer; moelens' own probe forward is neither recorded nor steered."""

from __future__ import annotations

import pytest
import torch

import moelens
from moelens.hooks import routing_check
from moelens.hooks.adapters import moe_view
from moelens.interventions import disable, intervene, rank, top_k
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


def _mid_forward(model, action):
    """A forward hook on the first MoE block that runs ``action()`` once, between layers of the
    next forward call: what a notebook cell does while a widget's worker thread runs generate."""
    block = moe_view(model).layers[0].block
    state = {"done": False}

    def hook(module, args, output):
        if not state["done"]:
            state["done"] = True
            action()

    return block.register_forward_hook(hook)


def test_attaching_a_client_mid_forward_keeps_the_running_step():
    model, tokenizer = moelens.load("tiny:mixtral")
    clean = _routes(model, tokenizer, PROMPTS)
    assert len(clean) > 0
    inner = moelens.trace(model)
    handle = _mid_forward(model, inner.__enter__)
    try:
        with torch.no_grad(), moelens.trace(model) as outer:
            model(**tokenizer(PROMPTS, return_tensors="pt", padding=True))
    finally:
        handle.remove()
        inner.__exit__(ValueError, None, None)  # it saw half a step: leave it without reading it
    assert outer.routes.equals(clean)


def test_a_routing_check_during_a_traced_forward_is_not_recorded():
    model, tokenizer = moelens.load("tiny:mixtral")
    clean = _routes(model, tokenizer, PROMPTS)
    rule = routing_check.routing_check(model).layers[moe_view(model).layers[0].index].rule
    problems = []
    handle = _mid_forward(model, lambda: problems.append(check_problem(model, rule)))
    try:
        with torch.no_grad(), moelens.trace(model) as traced:
            model(**tokenizer(PROMPTS, return_tensors="pt", padding=True))
    finally:
        handle.remove()
    assert problems == [None]
    assert traced.routes.equals(clean)


def test_a_scoped_intervention_steers_layers_recomputed_in_backward():
    """Gradient checkpointing reruns each layer's forward during backward, after the stack's
    forward has ended: the rewrite uses that step's tokens, so gradients equal those without
    checkpointing."""
    model, tokenizer = moelens.load("tiny:mixtral")
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    spec = disable({layer.index: [0] for layer in moe_view(model).layers}, tokens="prompt")
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        try:
            with intervene(model, spec):
                model(**batch, labels=batch["input_ids"]).loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        finally:
            model.activation_checkpointing_disable()
            model.eval()
            model.zero_grad()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_a_rank_that_a_token_may_not_have_is_refused():
    model, _ = moelens.load("tiny:mixtral")
    layer = moe_view(model).layers[0]
    with pytest.raises(moelens.SpecError, match=f"rank {layer.num_experts - 1} in layer {layer.index} needs"):
        with intervene(model, rank(layer.num_experts - 1) + disable({layer.index: [0, 1]})):
            pass
    with intervene(model, rank(layer.num_experts - 3) + disable({layer.index: [0, 1]})):
        pass  # the last rank every token still has
