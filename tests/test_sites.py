"""The observation sites own every hook moelens puts on a model: hooks exist only while a client
is attached and only where one needs them; observers compose; the rewrite comes before any
observer; moelens' own probe forward is neither recorded nor steered."""

from __future__ import annotations

import pytest
import torch

import moelens
from moelens.hooks import routing_check
from moelens.hooks.adapters import moe_view
from moelens.hooks.sites import sites_of
from moelens.interventions import apply, disable, intervene, keep, rank, top_k
from moelens.interventions.apply import active_intervention
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


def test_experts_run_without_their_router_is_a_trace_error():
    """A block whose forward skips its router (a replaced forward handing the experts a fixed
    routing) records nothing for the layer: the tracer says so instead of recording a stale read."""
    model, tokenizer = moelens.load("tiny:mixtral")
    layer = moe_view(model).layers[1]
    block = layer.block

    def without_router(hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        index = torch.zeros(len(flat), layer.top_k, dtype=torch.long)
        weights = torch.full((len(flat), layer.top_k), 1.0 / layer.top_k)
        return layer.experts(flat, index, weights).reshape(hidden_states.shape)

    block.forward = without_router
    with pytest.raises(moelens.TraceError, match=rf"MoE layers \[{layer.index}\] did not fire"):
        with torch.no_grad(), moelens.trace(model):
            model(**tokenizer(PROMPTS[:1], return_tensors="pt"))


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


def test_layers_recomputed_in_backward():
    """Activation checkpointing reruns each layer's forward during backward, outside any step: an
    intervention on all tokens steers the recomputation as it steered the forward (gradients equal
    those without checkpointing); a token-scoped one cannot know which step the recomputed tokens
    belong to, and refuses instead of steering the wrong tokens."""
    model, tokenizer = moelens.load("tiny:mixtral")
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    experts = {layer.index: [0] for layer in moe_view(model).layers}

    def gradients(spec, checkpointing):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        try:
            with intervene(model, spec):
                model(**batch, labels=batch["input_ids"]).loss.backward()
            return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        finally:
            model.activation_checkpointing_disable()
            model.eval()
            model.zero_grad()

    plain = gradients(disable(experts), checkpointing=False)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(gradients(disable(experts), checkpointing=True), plain)
    with pytest.raises(moelens.SpecError, match="activation checkpointing"):
        gradients(disable(experts, tokens="prompt"), checkpointing=True)


def test_a_rank_that_a_token_may_not_have_is_refused():
    model, _ = moelens.load("tiny:mixtral")
    layer = moe_view(model).layers[0]
    with pytest.raises(moelens.SpecError, match=f"rank {layer.num_experts - 1} in layer {layer.index} needs"):
        with intervene(model, rank(layer.num_experts - 1) + disable({layer.index: [0, 1]})):
            pass
    with intervene(model, rank(layer.num_experts - 3) + disable({layer.index: [0, 1]})):
        pass  # the last rank every token still has


def test_group_limited_rank_bound_counts_the_groups_a_token_can_open():
    """DeepSeek-V3 routes within its best topk_group groups; a group with no eligible expert is
    never opened ahead of one with some. keep() on 5 experts in 3 groups (sizes 2, 2, 1) leaves
    every token at least 3 eligible experts (the two smallest non-empty groups: 1 + 2), so rank(1),
    SCMoE's default, is allowed and no token gets an empty slot; rank(3) is refused. (Counting the
    11 disabled experts against the 8 a token opens refused every rank.)"""
    model, tokenizer = moelens.load("tiny:deepseek_v3")
    layer = next(layer for layer in moe_view(model).layers if routing_check.routing_check(model).layers[layer.index].rule.n_group > 1)
    kept = [0, 1, 4, 5, 8]  # groups of 4: {0, 1}, {4, 5}, {8}
    with torch.no_grad(), intervene(model, keep({layer.index: kept}) + rank(1)), moelens.trace(model) as tr:
        model(**tokenizer(PROMPTS, return_tensors="pt", padding=True))
    routes = tr.routes[tr.routes.layer == layer.index]
    assert len(routes) == len(tr.tokens) and set(routes.expert) <= set(kept)
    with pytest.raises(moelens.SpecError, match="as few as 3"):
        with intervene(model, keep({layer.index: kept}) + rank(3)):
            pass


def test_probing_survives_the_last_client_leaving():
    model, tokenizer = moelens.load("tiny:mixtral")
    sites = sites_of(model)
    with sites.probing(), pytest.raises(moelens.TraceError, match="no forward pass"):
        with torch.no_grad(), moelens.trace(model):  # the only client, attached and detached inside the probe
            model(**tokenizer(PROMPTS[:1], return_tensors="pt"))  # unseen, like the probe's own forward
    assert sites._thread.probing == 0
    assert len(_routes(model, tokenizer)) > 0


def test_attaching_the_first_client_between_a_router_and_its_experts():
    """The router ran before the client's hooks existed: the layer is left as it is for that call,
    and the forward goes on (another thread's forward is not broken by a notebook cell)."""
    model, tokenizer = moelens.load("tiny:mixtral")
    layer = moe_view(model).layers[0]
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    late = moelens.trace(model)
    state = {"done": False}

    def attach(module, args, output):
        if not state["done"]:
            state["done"] = True
            late.__enter__()

    handle = layer.router.register_forward_hook(attach)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        handle.remove()
        late.__exit__(ValueError, None, None)
    assert torch.equal(logits, expected)


def test_leaving_a_block_that_fails_to_rebind_ends_every_block(monkeypatch):
    """Any error while the remaining blocks are bound again (here a failing routing check) ends
    every block: nothing stays steered by the block that left."""
    model, tokenizer = moelens.load("tiny:mixtral")
    before = _hook_counts(model)
    layers = [layer.index for layer in moe_view(model).layers]

    def failing(*args, **kwargs):
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        with intervene(model, disable({layers[0]: [0]})):
            with intervene(model, disable({layers[1]: [0]})):
                monkeypatch.setattr(apply, "_bind", failing)
    assert active_intervention(model) is None and _hook_counts(model) == before


def test_a_model_and_its_base_model_share_one_session():
    """intervene(model, a) and intervene(model.model, b) act like a + b: one rewriter per decoder stack."""
    model, tokenizer = moelens.load("tiny:mixtral")
    layer = moe_view(model).layers[0].index
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    a, b = disable({layer: [0, 1]}), disable({layer: [2, 3]})
    with torch.no_grad(), intervene(model, a), intervene(model.model, b), moelens.trace(model) as both:
        model(**batch)
    with torch.no_grad(), intervene(model, a + b), moelens.trace(model) as combined:
        model(**batch)
    assert len(combined.routes) > 0 and both.routes.equals(combined.routes)
    assert active_intervention(model) is None
