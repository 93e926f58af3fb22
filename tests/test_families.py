"""Conformance over every MoE family of the installed transformers (tiny random models).

The model types are enumerated at collection time from the installed transformers, so a new
release's families are tested without a change here. Ground truths are independent of moelens'
discovery and hooks: the experts modules are found here by transformers' own mark (the
``use_experts_implementation`` decorator's attributes), and what they receive is read with this
file's own pre-hooks.
"""

from __future__ import annotations

import functools

import pytest
import torch

import moelens
from moelens.hooks.adapters import UnsupportedModelError, moe_layers
from moelens.hooks.routing_check import check_rule, routing_check
from moelens.interventions import disable, intervene, logit_bias
from moelens.zoo.families import family_reports, format_reports
from moelens.zoo.shrink import build_tiny_model, moe_model_types

MODEL_TYPES = moe_model_types()

# Families of transformers 5.24 that moelens traces but cannot steer yet, and why (the table's reasons say the same).
NOT_STEERABLE = {
    "deepseek_v4": "hash-routed first layers (token id -> experts); its other layers are steered (test below)",
    "inkling_text": "the shared experts' scores join the routed experts' normalisation",
    "phimoe": "sparsemixer weights are not a top-k of softmax or sigmoid scores",
    "zaya": "an extra 'skip' class in the router's softmax",
}
NOT_TRACED = {
    "doge": "its experts are rows of a product-key table, not a fused experts module",
    "jetmoe": "its experts take routing in another calling convention",
}


@functools.cache
def _built(model_type: str):
    try:
        return build_tiny_model(model_type), None
    except Exception as error:  # noqa: BLE001 - a family that cannot be built is listed, not counted
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _model(model_type: str):
    if model_type in NOT_TRACED:
        pytest.skip(f"{model_type}: not traced yet ({NOT_TRACED[model_type]})")
    model, reason = _built(model_type)
    if model is None:
        pytest.skip(f"{model_type}: the tiny model does not build in plain transformers ({reason})")
    return model


def _steerable(model_type: str):
    model = _model(model_type)
    if not routing_check(model).verified:
        pytest.skip(f"{model_type}: no routing rule reproduces it ({routing_check(model).problem})")
    return model


def _batch(model):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: these tokens must not be recorded
    return {"input_ids": ids, "attention_mask": mask}


def _experts_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """Experts modules as transformers' experts interface defines them: the decorator's mark, or a
    forward taking ``top_k_index``; inside a list of decoder layers (``...<list>.<i>....``)."""
    import inspect

    def is_experts(module):
        return hasattr(module, "_is_expert_parallel") or "top_k_index" in inspect.signature(type(module).forward).parameters

    found = [(name, m) for name, m in model.named_modules() if is_experts(m) and any(p.isdigit() for p in name.split("."))]
    assert found, "no experts module follows transformers' experts interface"
    return found


def _layer_of(name: str) -> int:
    return int(next(part for part in name.split(".") if part.isdigit()))


def _dense_routers(model) -> list[tuple[str, torch.nn.Module]]:
    """Routers whose experts take no routing arguments (Llama 4): by transformers' class naming,
    in layers without an experts-interface module; they return a dense [T, E] score matrix."""
    with_interface = {_layer_of(name) for name, _ in _experts_modules(model)} if _has_interface(model) else set()
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Router") and any(p.isdigit() for p in name.split(".")) and _layer_of(name) not in with_interface
    ]


def _has_interface(model) -> bool:
    try:
        _experts_modules(model)
    except AssertionError:
        return False
    return True


def _received(model, batch):
    """{layer: (index [T, k], weights [T, k])} for the real tokens, as the experts received them
    (for dense-score routers: the non-zero scores of the matrix the block applies to the experts)."""
    seen = {}

    def dense(name):
        def record(module, args, output):
            scores = output[0].reshape(-1, output[0].shape[-1])
            k = int((scores[0] != 0).sum())
            index = torch.stack([row.nonzero().flatten() for row in scores])  # every row has k non-zeros
            assert index.shape[1] == k
            seen[_layer_of(name)] = (index, scores.gather(-1, index).float())

        return record

    def hook(name):
        def record(module, args, kwargs):
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            seen[_layer_of(name)] = (index.clone(), weights.float().clone())

        return record

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in _experts_modules(model)] if _has_interface(model) else []
    handles += [m.register_forward_hook(dense(name)) for name, m in _dense_routers(model)]
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    return {layer: (index[real], weights[real]) for layer, (index, weights) in seen.items()}, logits


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_trace_equals_what_the_experts_received(model_type):
    model = _model(model_type)
    batch = _batch(model)
    received, _ = _received(model, batch)
    assert received
    with torch.no_grad(), moelens.trace(model) as tracer:
        model(**batch)
    routes = tracer.routes
    assert sorted(routes["layer"].unique()) == sorted(received)
    tokens = tracer.tokens.sort_values(["prompt_id", "position"])
    assert len(tokens) == int(batch["attention_mask"].sum())
    for layer, (index, weights) in received.items():
        got = routes[routes.layer == layer].sort_values(["prompt_id", "position", "expert"])
        expected_index, order = index.sort(dim=-1)
        assert got["expert"].tolist() == expected_index.reshape(-1).tolist()
        expected_weights = weights.gather(-1, order).reshape(-1)
        # the store keeps weights as float16 (relative resolution 2^-11)
        torch.testing.assert_close(torch.tensor(got["weight"].tolist()), expected_weights, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_identity_rerouting_reproduces_the_logits(model_type):
    """Every MoE layer re-routed through the kernel with nothing changed (a zero logit bias)."""
    model = _steerable(model_type)
    batch = _batch(model)
    received, plain = _received(model, batch)
    spec = logit_bias({layer.index: {0: 0.0} for layer in moe_layers(model)})
    with intervene(model, spec):
        rerouted, logits = _received(model, batch)
    assert received and set(rerouted) == set(received)
    for layer, (index, weights) in received.items():
        assert torch.equal(rerouted[layer][0].sort(dim=-1).values, index.sort(dim=-1).values)
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_disabling_an_expert_removes_it(model_type):
    model = _steerable(model_type)
    batch = _batch(model)
    received, plain = _received(model, batch)
    layer = min(received)
    busiest = int(received[layer][0].reshape(-1).bincount().argmax())
    with intervene(model, disable({layer: [busiest]})):
        steered, logits = _received(model, batch)
    assert busiest not in steered[layer][0].reshape(-1).tolist()
    assert not torch.equal(logits, plain)
    _, after = _received(model, batch)
    assert torch.equal(after, plain)  # the model leaves the block as it was


def test_a_mis_specified_rule_is_refused_with_what_differed():
    model = build_tiny_model("mixtral")
    rule = routing_check(model).rule
    assert rule is not None and rule.renormalize
    from dataclasses import replace

    check = check_rule(model, replace(rule, renormalize=False))
    assert not check.verified and check.problem.startswith("weights differ at layer 0 on 32 of 32 tokens")
    check = check_rule(model, replace(rule, score="sigmoid", renormalize=False))
    assert not check.verified and "differ at layer 0" in check.problem
    check = check_rule(model, replace(rule, top_k=3))
    assert not check.verified and "the experts receive 2 experts per token, the rule selects 3" in check.problem
    assert check_rule(model, rule).verified


def test_an_unreproducible_router_is_traced_but_not_steered():
    model = build_tiny_model("phimoe")  # sparsemixer: weights are not a top-k of softmax or sigmoid scores
    with torch.no_grad(), moelens.trace(model) as tracer:
        model(**_batch(model))
    assert len(tracer.routes) > 0
    with pytest.raises(UnsupportedModelError, match="cannot steer layer 0: .*weights differ at layer 0"):
        with intervene(model, disable({0: [0]})):
            pass


def test_deepseek_v4_steers_its_learned_layers_and_refuses_its_hash_layers():
    """DeepSeek-V4: the first layers pick experts from a fixed token-id table, the others with
    sqrt(softplus) scores plus a correction bias. Disabling an expert in a learned layer is checked
    against the routing computed by hand from that router's logits and bias."""
    model = build_tiny_model("deepseek_v4")
    check = routing_check(model)
    hashed = [i for i, kind in enumerate(model.config.mlp_layer_types) if kind == "hash_moe"]
    learned = [layer for layer in moe_layers(model) if layer.index not in hashed]
    assert hashed and learned and check.steerable_layers == [layer.index for layer in learned]
    with pytest.raises(UnsupportedModelError, match=f"cannot steer layer {hashed[0]}"):
        with intervene(model, disable({hashed[0]: [0]})):
            pass
    layer = learned[0]
    batch = _batch(model)
    with torch.no_grad(), moelens.trace(model) as plain:
        model(**batch)
    busiest = int(plain.routes.query("layer == @layer.index")["expert"].value_counts().index[0])
    seen = {}
    handles = [
        layer.router.register_forward_hook(lambda m, a, out: seen.update(logits=out[0].float())),
        layer.experts.register_forward_pre_hook(lambda m, a: seen.update(index=a[1], weights=a[2].float())),
    ]
    try:
        with torch.no_grad(), intervene(model, disable({layer.index: [busiest]})):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    scores = torch.sqrt(torch.nn.functional.softplus(seen["logits"]))  # [T, E]
    choice = (scores + layer.router.e_score_correction_bias.float()).index_fill(1, torch.tensor([busiest]), float("-inf"))
    index = choice.topk(layer.top_k, dim=-1).indices
    weights = scores.gather(1, index)
    weights = weights / weights.sum(dim=-1, keepdim=True) * model.config.routed_scaling_factor
    got_order, want_order = seen["index"].argsort(dim=-1), index.argsort(dim=-1)
    assert not (seen["index"] == busiest).any()
    assert torch.equal(seen["index"].gather(1, got_order), index.gather(1, want_order))
    torch.testing.assert_close(seen["weights"].gather(1, got_order), weights.gather(1, want_order))


def test_a_router_null_class_is_recorded_as_no_expert():
    """Zaya's router scores a skip class beside its experts; a slot the skip class wins reaches the
    experts as expert 0 with weight 0. The trace records no expert there: checked against the
    selection computed by hand from the router's logits and balancing biases."""
    model = build_tiny_model("zaya")
    routers = {layer.index: layer.router for layer in moe_layers(model)}
    for router in routers.values():
        router.balancing_biases[-1] = 0.0  # skip often enough to test, not always (its default is -1)
    logits = {}
    handles = [r.register_forward_hook(lambda m, a, out, i=i: logits.update({i: out[0].float()})) for i, r in routers.items()]
    batch = _batch(model)
    try:
        with torch.no_grad(), moelens.trace(model) as tracer:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"].bool()
    tokens = [(row, position) for row in range(len(mask)) for position in range(int(mask[row].sum()))]  # real tokens, in order
    skipped = 0
    for index, router in routers.items():
        chosen = (torch.softmax(logits[index], dim=-1) + router.balancing_biases).topk(router.top_k, dim=-1).indices
        chosen = chosen[mask.reshape(-1)].tolist()  # [real tokens, k]
        skipped += sum(row.count(router.num_experts) for row in chosen)
        want = sorted((*token, e) for token, row in zip(tokens, chosen) for e in row if e != router.num_experts)
        routes = tracer.routes.query("layer == @index")
        assert sorted(zip(routes["prompt_id"], routes["position"], routes["expert"])) == want, index
    assert skipped > 0 and len(tracer.routes) > 0


def test_coverage_of_the_installed_transformers():
    """Every family that builds is traced and steered, except the listed ones (each with its reason)."""
    reports = family_reports(MODEL_TYPES)
    built = [r for r in reports if r.built]
    table = format_reports(reports)
    assert len(built) >= 60, table
    assert {r.model_type for r in built if not r.traced} <= set(NOT_TRACED), table
    assert {r.model_type for r in built if not r.steerable} <= set(NOT_TRACED) | set(NOT_STEERABLE), table
    assert all(r.reason for r in reports if not r.steerable)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pruned_export_round_trips(model_type, tmp_path):
    """Where the family allows it, the exported (pruned) checkpoint computes what the keep intervention does."""
    from moelens.interventions import keep as keep_experts
    from moelens.interventions.export import export_pruned
    from moelens.interventions.spec import SpecError
    from moelens.zoo.tiny import build_byte_tokenizer

    model = _steerable(model_type)
    layers = moe_layers(model)
    keep_count = max(layers[0].top_k, layers[0].num_experts // 2)
    keep = {layer.index: list(range(1, keep_count + 1)) for layer in layers}
    batch = _batch(model)
    with torch.no_grad(), intervene(model, keep_experts(keep)):
        expected = model(**batch).logits
    try:
        export_pruned(model, build_byte_tokenizer(), keep_experts(keep), tmp_path / "pruned")
    except SpecError as refusal:
        pytest.skip(f"{model_type}: export refused: {refusal}")
    reloaded = type(model).from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        got = reloaded(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_per_expert_scales_are_verified_and_do_not_change_the_rank():
    """Gemma 4 multiplies each chosen expert's weight by a learned scale (random in the tiny model):
    the rule is verified only with it, and a trace's rank 0 is still the router's most probable expert."""
    from dataclasses import replace

    from moelens.hooks.routing_check import RouterReading

    model = _model("gemma4_text")
    check = routing_check(model)
    assert check.verified and check.reading == RouterReading(probabilities=True, expert_scale=True)
    without_scale = check_rule(model, check.rule, replace(check.reading, expert_scale=False))
    assert not without_scale.verified and "weights differ" in without_scale.problem
    layer = moe_layers(model)[0]
    probabilities = []
    handle = layer.router.register_forward_hook(lambda module, args, output: probabilities.append(output[0].detach()))
    batch = _batch(model)
    try:
        with torch.no_grad(), moelens.trace(model) as tracer:
            model(**batch)
    finally:
        handle.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    first = tracer.routes.query("layer == @layer.index and rank == 0").sort_values(["prompt_id", "position"])
    assert first["expert"].tolist() == probabilities[-1][real].argmax(dim=-1).tolist()


def test_a_layer_no_rule_reproduces_is_refused_alone():
    """Rules are verified per layer: a layer whose router does something the kernel cannot (here
    its weights squared after the family's routing) is traced but not steered; the others are."""
    from moelens.interventions import disable

    model = build_tiny_model("qwen3_moe")
    first, second = moe_layers(model)[:2]
    original = second.router.forward

    def squared(hidden_states):
        logits, weights, indices = original(hidden_states)
        return logits, weights**2, indices

    second.router.forward = squared
    check = routing_check(model)
    assert not check.verified and check.layers[first.index].rule is not None and check.layers[second.index].rule is None
    assert f"weights differ at layer {second.index}" in check.layers[second.index].problem
    batch = _batch(model)
    with intervene(model, disable({first.index: [0]})), moelens.trace(model) as tracer:
        with torch.no_grad():
            model(**batch)
    assert 0 not in set(tracer.routes.query("layer == @first.index")["expert"]) and len(tracer.routes.query("layer == @second.index"))
    with pytest.raises(UnsupportedModelError, match=rf"cannot steer layer {second.index}: .* Layers \[{first.index}\] are steerable"):
        with intervene(model, disable({second.index: [0]})):
            pass


def test_top_k_on_a_dense_score_family_keeps_its_weights_and_records_no_phantom_experts():
    """Llama 4 (sigmoid of the chosen logits, no renormalisation): top_k(1) gives each token its best
    expert at the router's own weight, sigmoid(max logit); the trace holds exactly one expert per token."""
    from moelens.interventions import top_k

    model = _model("llama4_text")
    layer = moe_layers(model)[0]
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.append(output))
    batch = _batch(model)
    try:
        with torch.no_grad(), intervene(model, top_k(1)), moelens.trace(model) as tracer:
            model(**batch)
    finally:
        handle.remove()
    scores, logits = seen[-1][0].float(), seen[-1][1].float()
    assert ((scores != 0).sum(dim=-1) == 1).all()
    torch.testing.assert_close(scores.max(dim=-1).values, torch.sigmoid(logits.max(dim=-1).values))
    per_token = tracer.routes.query("layer == @layer.index").groupby(["prompt_id", "position"]).size()
    assert len(per_token) == int(batch["attention_mask"].sum()) and (per_token == 1).all()


def test_models_are_not_kept_alive_by_moelens():
    import gc
    import weakref

    model = build_tiny_model("mixtral")
    base = model.model  # a base model passed directly: its own decoder stack
    with torch.no_grad(), intervene(model, disable({0: [1]})), moelens.trace(model):
        model(**_batch(model))
    moe_layers(base)
    alive = weakref.ref(model)
    del model, base
    gc.collect()
    assert alive() is None


def test_the_routing_check_is_redone_after_a_router_changes():
    model = build_tiny_model("mixtral")
    assert routing_check(model).verified
    router = moe_layers(model)[0].router
    with torch.no_grad():
        router.weight.zero_()  # every token ties: nothing to verify against
    check = routing_check(model)
    assert not check.verified and "tie" in check.problem
