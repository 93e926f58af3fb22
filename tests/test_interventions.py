"""Interventions on live models of every family whose routing the kernel reproduces.

Ground truths: the family's own router (no-op spec), hooks written here that read what the
experts received, a straightforward two-pass SCMoE implementation, and hand-built expectations."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moelens
from moelens.hooks.adapters import UnsupportedModelError, moe_layers
from moelens.interventions import (
    Drop,
    Intervention,
    Reroute,
    SpecError,
    disable,
    force,
    intervene,
    keep,
    logit_bias,
    rank,
    reweight,
    top_k,
    top_p,
)
from moelens.interventions.apply import bind
from moelens.interventions.contrast import contrast_logits, generate_contrast
from moelens.zoo.tiny import TINY_FAMILIES
from tests.conftest import PROMPTS

KERNEL_FAMILIES = [f for f in TINY_FAMILIES if f != "phimoe"]  # PhiMoE's sparsemixer is not a top-k rule


@pytest.fixture(params=KERNEL_FAMILIES)
def routed(request):
    model, tokenizer = moelens.load(f"tiny:{request.param}")
    return model, tokenizer, tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _expert_inputs(model):
    """Capture what each MoE layer's experts module received: (indices [T, k], weights [T, k])."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index):
        def record(module, args, kwargs):
            indices, weights = args[1], args[2]
            seen[index] = (indices.clone(), weights.clone())

        return record

    handles = [layer.experts.register_forward_pre_hook(hook(layer.index), with_kwargs=True) for layer in moe_layers(model)]
    return seen, handles


def _by_expert(indices, weights):
    """Slots ordered by expert id: DeepSeek's own top-k is unsorted, the kernel's is by score."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def _run(model, batch, spec=None):
    seen, handles = _expert_inputs(model)
    try:
        with torch.no_grad():
            if spec is None:
                logits = model(**batch).logits
            else:
                with intervene(model, spec):
                    logits = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    # padding rows have all-equal router logits, where top-k ties break arbitrarily: compare real tokens
    real = batch["attention_mask"].reshape(-1).bool()
    return logits, {layer: (indices[real], weights[real]) for layer, (indices, weights) in seen.items()}


def test_no_op_routing_reproduces_the_family_router(routed):
    model, _, batch = routed
    baseline, own = _run(model, batch)
    layers = [layer.index for layer in moe_layers(model)]
    logits, ours = _run(model, batch, logit_bias({layers[0]: {0: 0.0}}))  # routes every layer-0 token through the kernel
    own_i, own_w = own[layers[0]]
    our_i, our_w = ours[layers[0]]
    order_own, order_our = own_i.sort(dim=-1), our_i.sort(dim=-1)
    assert torch.equal(order_own.values, order_our.values)  # same expert sets (DeepSeek top-k is unsorted)
    torch.testing.assert_close(own_w.gather(-1, order_own.indices).float(), our_w.gather(-1, order_our.indices).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, baseline, rtol=1e-5, atol=1e-5)


def test_model_is_bitwise_restored_even_when_the_body_raises(routed):
    model, _, batch = routed
    with torch.no_grad():
        before = model(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layer = moe_layers(model)[0].index
    with pytest.raises(KeyError):
        with intervene(model, disable({layer: [0]}) + reweight({layer: [1]}, 4.0) + top_p(0.5)):
            with torch.no_grad():
                model(**batch)
            raise KeyError("body failed")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert moelens.interventions.active_intervention(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_disable_reroute_never_selects_and_fills_the_slot(routed):
    model, _, batch = routed
    layer = moe_layers(model)[0]
    _, base = _run(model, batch)
    victims = base[layer.index][0][:, 0].unique()[:2].tolist()  # experts that really were top-1 somewhere
    _, seen = _run(model, batch, disable({layer.index: victims}))
    indices, _ = seen[layer.index]
    assert not torch.isin(indices, torch.tensor(victims)).any()
    assert indices.shape[-1] == layer.top_k and (indices < layer.num_experts).all()


def test_disable_drop_keeps_the_choice_with_zero_weight(routed):
    model, _, batch = routed
    layer = moe_layers(model)[0]
    _, base = _run(model, batch)
    base_i, base_w = base[layer.index]
    victim = int(base_i[0, 0])
    _, seen = _run(model, batch, disable({layer.index: [victim]}, mode="drop"))
    indices, weights = _by_expert(*seen[layer.index])
    base_i, base_w = _by_expert(base_i, base_w)
    assert torch.equal(indices, base_i)  # same choice
    assert (weights[indices == victim] == 0).all()
    kept = indices != victim
    torch.testing.assert_close(weights[kept].float(), base_w[kept].float(), rtol=1e-5, atol=1e-6)  # not redistributed


def test_drop_with_renormalize_preserves_the_total(routed):
    model, _, batch = routed
    layer = moe_layers(model)[0]
    _, base = _run(model, batch)
    base_i, base_w = base[layer.index]
    victim = int(base_i[0, 0])
    _, seen = _run(model, batch, disable({layer.index: [victim]}, mode=Drop(renormalize=True)))
    torch.testing.assert_close(seen[layer.index][1].float().sum(-1), base_w.float().sum(-1), rtol=1e-4, atol=1e-5)


def test_force_takes_the_last_slot(routed):
    model, _, batch = routed
    layer = moe_layers(model)[0]
    _, base = _run(model, batch)
    base_i, base_w = base[layer.index]
    forced = int(base_i.flatten().bincount(minlength=layer.num_experts).argmin())  # the least chosen expert
    _, seen = _run(model, batch, force({layer.index: [forced]}))
    indices, weights = seen[layer.index]
    newcomer = ~(base_i == forced).any(dim=-1)  # tokens that did not choose it on their own
    assert newcomer.any() and (indices[newcomer, -1] == forced).all()
    # the other slots keep experts the token had chosen on its own (the lowest-ranked one made room)
    assert (indices[newcomer, :-1, None] == base_i[newcomer, None, :]).any(dim=-1).all()


def test_reweight_multiplies_the_chosen_weight(routed):
    model, _, batch = routed
    layer = moe_layers(model)[0]
    _, base = _run(model, batch)
    base_i, base_w = base[layer.index]
    target = int(base_i[0, 0])
    _, seen = _run(model, batch, reweight({layer.index: [target]}, 8.0))
    indices, weights = _by_expert(*seen[layer.index])
    base_i, base_w = _by_expert(base_i, base_w)
    hit = base_i == target
    torch.testing.assert_close(weights[indices == target].float(), 8 * base_w[hit].float(), rtol=1e-4, atol=1e-5)


def test_rank_1_routes_to_the_second_choice_with_weight_one(routed):
    model, _, batch = routed
    layer = moe_layers(model)[0]
    if model.config.model_type in ("deepseek_v2", "deepseek_v3"):
        pytest.skip("group-limited routing ranks within the allowed groups; covered by the kernel grid")
    router_logits = []

    def keep_logits(module, args, output):
        router_logits.append(output[0].float())

    handle = layer.router.register_forward_hook(keep_logits)
    try:
        _, seen = _run(model, batch, rank(1))
    finally:
        handle.remove()
    indices, weights = seen[layer.index]
    second = router_logits[-1][batch["attention_mask"].reshape(-1).bool()].topk(2, dim=-1).indices[:, 1]
    assert torch.equal(indices[:, 0], second) and (weights == 1).all()


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_rank_weight_carries_the_routed_scaling_factor(family):
    """SCMoE's weak expert on the family's scale: what the experts receive is routed_scaling_factor."""
    model, tokenizer = moelens.load(f"tiny:{family}")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    _, seen = _run(model, batch, rank(1))
    scale = model.config.routed_scaling_factor
    assert scale != 1.0 and seen
    for indices, weights in seen.values():
        assert indices.shape[1] >= 1
        filled = weights[weights != 0]
        assert len(filled) == len(weights)  # one expert per token, weight `scale`
        torch.testing.assert_close(filled, torch.full_like(filled, scale))


def test_keep_routes_only_to_the_given_experts(routed):
    model, _, batch = routed
    layer = moe_layers(model)[0]
    kept = list(range(0, layer.num_experts, 2))
    _, seen = _run(model, batch, keep({layer.index: kept}))
    assert torch.isin(seen[layer.index][0], torch.tensor(kept)).all()


def test_token_scope_generated_leaves_the_prompt_alone():
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    layer = moe_layers(model)[0].index
    with torch.no_grad(), moelens.trace(model) as plain:
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    experts_used = plain.routes.query("layer == @layer")["expert"].value_counts().index[:3].tolist()
    spec = disable({layer: experts_used}, tokens="generated")
    with torch.no_grad(), intervene(model, spec), moelens.trace(model) as steered:
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    routes = steered.routes.merge(steered.tokens[["prompt_id", "position", "generated"]], on=["prompt_id", "position"])
    at_layer = routes[routes.layer == layer]
    assert not at_layer[at_layer.generated]["expert"].isin(experts_used).any()
    prompt_part = plain.routes.merge(plain.tokens[["prompt_id", "position", "generated"]], on=["prompt_id", "position"])
    assert at_layer[~at_layer.generated]["expert"].tolist() == prompt_part[(prompt_part.layer == layer) & ~prompt_part.generated]["expert"].tolist()


def test_explicit_positions_and_rows():
    model, tokenizer = moelens.load("tiny:mixtral")
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    layer = moe_layers(model)[0].index
    with torch.no_grad(), moelens.trace(model) as plain:
        model(**batch)
    first = int(plain.routes.query("layer == @layer and position == 2 and rank == 0")["expert"].iloc[0])
    with torch.no_grad(), intervene(model, disable({layer: [first]}, tokens=[2]), rows=slice(0, 1)), moelens.trace(model) as steered:
        model(**batch)
    merged = plain.routes.merge(steered.routes, on=["prompt_id", "position", "layer", "rank"], suffixes=("_plain", "_steered"))
    changed = merged[merged.expert_plain != merged.expert_steered]
    assert set(changed["prompt_id"]) == {0} and set(changed["position"]) == {2} and set(changed["layer"]) == {layer}


def test_trace_sees_the_intervened_routing_in_any_nesting_order():
    model, tokenizer = moelens.load("tiny:olmoe")
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    layer = moe_layers(model)[0].index
    spec = disable({layer: [0, 1, 2]})
    with torch.no_grad(), moelens.trace(model) as outer_trace, intervene(model, spec):
        model(**batch)
    with torch.no_grad(), intervene(model, spec), moelens.trace(model) as inner_trace:
        model(**batch)
    for tracer in (outer_trace, inner_trace):
        assert not tracer.routes.query("layer == @layer")["expert"].isin([0, 1, 2]).any()


def test_top_p_uses_fewer_experts_on_confident_tokens():
    model, tokenizer = moelens.load("tiny:qwen3_moe")  # top-4 of 16
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), intervene(model, top_p(0.3, max_k=8)), moelens.trace(model) as tracer:
        model(**batch)
    per_token = tracer.routes.groupby(["prompt_id", "position", "layer"]).size()
    assert per_token.min() >= 1 and per_token.max() <= 8 and per_token.nunique() > 1


def test_spec_json_round_trip():
    spec = (
        disable({1: [3, 5]}, mode=Drop(renormalize=True), tokens="prompt")
        + force({2: [7]})
        + reweight({1: [2]}, 64.0, renormalize=True)
        + logit_bias({2: {4: -1.5}}, tokens=[0, 3])
        + top_p(0.4, max_k=6, layers=[1])
        + rank(1)
        + keep({2: [0, 1, 2, 3]})
    )
    assert Intervention.from_json(spec.to_json()) == spec


def test_disable_modes_are_typed_and_serialised_as_objects():
    assert disable({1: [0]}).parts[0].mode == Reroute()
    assert disable({1: [0]}, mode="drop").parts[0].mode == Drop(renormalize=False)
    assert disable({1: [0]}, mode=Drop(renormalize=True)).to_dict()["interventions"][0] == {
        "kind": "disable", "tokens": "all", "experts": {"1": [0]}, "mode": {"kind": "drop", "renormalize": True},
    }
    assert disable({1: [0]}).to_dict()["interventions"][0]["mode"] == {"kind": "reroute"}


def test_renormalize_with_reroute_cannot_be_written():
    """Renormalising belongs to dropping: Reroute takes no argument, and disable() no renormalize flag."""
    with pytest.raises(TypeError):
        Reroute(renormalize=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        disable({1: [0]}, mode="drop", renormalize=True)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("old", "mode"),
    [
        pytest.param({"mode": "drop", "renormalize": True}, Drop(renormalize=True), id="drop-renormalized"),
        pytest.param({"mode": "drop", "renormalize": False}, Drop(), id="drop"),
        pytest.param({"mode": "reroute", "renormalize": False}, Reroute(), id="reroute"),
        pytest.param({"mode": "drop"}, Drop(), id="drop-without-flag"),
        pytest.param({}, Reroute(), id="no-mode"),
    ],
)
def test_specs_written_with_the_old_flag_fields_still_load(old, mode):
    text = json.dumps({"interventions": [{"kind": "disable", "experts": {"1": [3]}, "tokens": "prompt", **old}]})
    assert Intervention.from_json(text) == disable({1: [3]}, mode=mode, tokens="prompt")


# --- one vocabulary: spec format version 2, and version-less (version 1) specs keep their meaning -----------
def test_specs_are_written_as_version_2_with_the_new_words():
    data = (top_p(0.5, layers=[2]) + top_k(1, layers=[1]) + rank(1, layers=[1, 2]) + keep({1: [0, 2, 4]})).to_dict()
    assert data["version"] == 2
    assert [part["kind"] for part in data["interventions"]] == ["top_p", "top_k", "rank", "keep"]
    assert [part["layers"] for part in data["interventions"][:3]] == [[2], [1], [1, 2]]
    assert data["interventions"][2]["rank"] == 1
    assert data["interventions"][3]["experts"] == {"1": [0, 2, 4]}
    assert not any("only_layers" in part or "keep" in part for part in data["interventions"])
    assert Intervention.from_dict(data) == Intervention.from_json(json.dumps(data))


def test_part_fields_and_touched_layers():
    part = rank(layers=[2, 1, 2]).parts[0]
    assert part.rank == 1 and part.layers == (1, 2) and part.touched_layers() == (1, 2)
    assert top_p(0.5).parts[0].layers is None and top_p(0.5).parts[0].touched_layers() is None
    assert keep({2: [3, 1]}).parts[0].experts == {2: (1, 3)} and keep({2: [3, 1]}).parts[0].touched_layers() == (2,)
    assert disable({1: [0], 2: [1]}).parts[0].touched_layers() == (1, 2)


def test_an_old_rank_spec_loads_as_the_same_choice_and_routes_exactly_as_before():
    """A version-less spec counted ranks from 1: its rank 2 (SCMoE's second choice) is rank(1) now."""
    old = '{"interventions": [{"kind": "rank", "rank": 2, "only_layers": [1], "tokens": "all"}]}'
    spec = Intervention.from_json(old)
    assert spec == rank(1, layers=[1])
    model, tokenizer = moelens.load("tiny:qwen2_moe")  # MoE layers 1 and 2
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    layer = moe_layers(model)[0]
    router_logits = []
    handle = layer.router.register_forward_hook(lambda module, args, output: router_logits.append(output[0].float()))
    try:
        _, seen = _run(model, batch, spec)
    finally:
        handle.remove()
    indices, weights = seen[layer.index]
    second = router_logits[-1][batch["attention_mask"].reshape(-1).bool()].topk(2, dim=-1).indices[:, 1]
    assert torch.equal(indices[:, 0], second) and (weights == 1).all()
    assert [plan.layer.index for plan in bind(model, spec)] == [1]  # only_layers [1]: layer 2 keeps its own routing
    # and the new spec written back says the same thing in version 2's words
    assert Intervention.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["interventions"][0]["rank"] == 1


def test_rank_0_is_the_routers_first_choice():
    model, tokenizer = moelens.load("tiny:qwen2_moe")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    _, first = _run(model, batch, rank(0))
    _, top1 = _run(model, batch, top_k(1))
    for index in first:
        assert torch.equal(first[index][0][:, 0], top1[index][0][:, 0])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param({"kind": "rank", "rank": 2}, rank(1), id="rank-2-is-the-second-choice"),
        pytest.param({"kind": "rank", "rank": 1, "only_layers": None}, rank(0), id="rank-1-is-the-first-choice"),
        pytest.param({"kind": "rank"}, rank(1), id="rank-default"),
        pytest.param({"kind": "prune", "keep": {"1": [0, 1, 2]}}, keep({1: [0, 1, 2]}), id="prune-is-keep"),
        pytest.param({"kind": "top_p", "p": 0.5, "only_layers": [2]}, top_p(0.5, layers=[2]), id="top-p-only-layers"),
        pytest.param({"kind": "top_k", "k": 1, "only_layers": [1, 2]}, top_k(1, layers=[1, 2]), id="top-k-only-layers"),
    ],
)
def test_version_less_specs_keep_their_meaning(old, new):
    assert Intervention.from_json(json.dumps({"interventions": [old]})) == new
    assert Intervention.from_dict({"version": 1, "interventions": [old]}) == new


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param({"interventions": [{"kind": "rank", "rank": 0}]}, 'rank 0 in a spec without "version" (format 1, ranks counted from 1)', id="old-rank-zero"),
        pytest.param({"version": 2, "interventions": [{"kind": "rank", "rank": 1, "only_layers": [1]}]}, "unknown field(s) 'only_layers' for kind 'rank'", id="v2-only-layers"),
        pytest.param({"version": 2, "interventions": [{"kind": "rank", "only_layers": [1]}]}, 'version 2 calls "only_layers" "layers"', id="v2-only-layers-hint"),
        pytest.param({"version": 2, "interventions": [{"kind": "prune", "keep": {"1": [0]}}]}, "unknown kind 'prune'", id="v2-prune"),
        pytest.param({"version": 2, "interventions": [{"kind": "prune", "keep": {"1": [0]}}]}, 'calls restricting routing to kept experts "keep"', id="v2-prune-hint"),
        pytest.param({"interventions": [{"kind": "rank", "rank": 1, "layers": [1]}]}, 'a rank part with "layers" in a spec without "version" is ambiguous', id="old-rank-with-new-layers"),
        pytest.param({"version": 3, "interventions": []}, "unknown spec format version 3", id="future-version"),
        pytest.param({"version": 2, "interventions": [{"kind": "keep", "experts": {"1": [0, 1]}, "tokens": "prompt"}]}, "keep applies to every token", id="keep-scoped"),
    ],
)
def test_version_errors_name_the_problem(data, message):
    with pytest.raises(SpecError) as error:
        Intervention.from_dict(data)
    assert message in str(error.value)


def test_an_old_spec_with_renormalized_rerouting_says_how_to_update_it():
    text = '{"interventions": [{"kind": "disable", "experts": {"1": [3]}, "mode": "reroute", "renormalize": true}]}'
    with pytest.raises(SpecError, match='renormalize applies to dropping only.*"kind": "drop", "renormalize": true'):
        Intervention.from_json(text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(force({1: [0]}) + top_p(0.5), "top_p and force apply to the same tokens", id="force-and-top-p"),
        pytest.param(rank(1) + top_p(0.5), "top_p and rank apply to the same tokens", id="rank-and-top-p"),
    ],
)
def test_alternative_selections_for_the_same_tokens_are_refused_at_bind(spec, message):
    model, _ = moelens.load("tiny:qwen2_moe")
    with pytest.raises(SpecError, match=message):
        with intervene(model, spec):
            pass


@pytest.mark.parametrize(
    ("spec_json", "message"),
    [
        pytest.param("{not json", "not valid JSON", id="unparsable"),
        pytest.param('{"interventions": [{"kind": "disable", "experts": {"1": [0]}, "modee": "drop"}]}', "unknown field(s) 'modee' for kind 'disable'", id="unknown-field"),
        pytest.param('{"interventions": [{"kind": "explode"}]}', "unknown kind 'explode'", id="unknown-kind"),
        pytest.param('{"layers": []}', 'expected {"interventions": [...]}', id="wrong-top-level"),
    ],
)
def test_bad_spec_files(spec_json, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")):
        Intervention.from_json(spec_json)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        pytest.param(lambda: reweight({1: [0]}, 0.0), "factor must be a finite number > 0", id="factor-zero"),
        pytest.param(lambda: reweight({1: [0]}, -2), "factor must be a finite number > 0", id="factor-negative"),
        pytest.param(lambda: top_p(0.0), r"p must be in \(0, 1\]", id="p-zero"),
        pytest.param(lambda: top_p(1.5), r"p must be in \(0, 1\]", id="p-above-one"),
        pytest.param(lambda: rank(-1), r"r must be an integer >= 0, got -1; rank r counts from 0 \(0 = the router's first choice\)", id="rank-negative"),
        pytest.param(lambda: disable({1: [0]}, mode="erase"), "mode='erase'", id="unknown-mode"),
    ],
)
def test_bad_values_fail_at_construction(build, message):
    with pytest.raises(SpecError, match=message):
        build()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(disable({9: [0]}), "layer 9 is out of range: the model has layers 0-2; MoE layers are [1, 2]", id="layer-out-of-range"),
        pytest.param(disable({0: [0]}), "layer 0 is dense (no router); MoE layers are [1, 2]", id="dense-layer"),
        pytest.param(disable({1: [8]}), "expert 8 in layer 1 is out of range: experts are 0-7", id="expert-out-of-range"),
        pytest.param(disable({1: list(range(8))}), "leaves 0 of 8 experts, fewer than top-k = 2", id="disable-every-expert"),
        pytest.param(disable({1: [3]}) + force({1: [3]}), "expert 3 is both forced and disabled", id="force-and-disable"),
        pytest.param(force({1: [0, 1, 2]}), "3 experts forced in layer 1, but only top-k = 2 slots exist", id="force-more-than-k"),
        pytest.param(rank(8), "rank 8 is out of range for the 8 experts of layer 1 (ranks 0-7); rank r counts from 0 (0 = the router's first choice)", id="rank-above-experts"),
    ],
)
def test_specs_that_do_not_fit_the_model(spec, message):
    model, tokenizer = moelens.load("tiny:qwen2_moe")  # layers 0 (dense), 1, 2; 8 experts, top-2
    with torch.no_grad():
        before = model(**tokenizer(["x"], return_tensors="pt")).logits
    with pytest.raises(SpecError) as error:
        with intervene(model, spec):
            pass
    assert message in str(error.value)
    with torch.no_grad():
        assert torch.equal(model(**tokenizer(["x"], return_tensors="pt")).logits, before)


def test_phimoe_interventions_are_refused_clearly():
    model, _ = moelens.load("tiny:phimoe")
    with pytest.raises(UnsupportedModelError, match=r"cannot steer layer 0: no routing rule reproduces its router .* weights differ at layer 0"):
        with intervene(model, disable({0: [0]})):
            pass


def test_a_family_without_routing_rule_is_still_collected_and_analysed(tmp_path, capsys):
    """Tracing never needs a routing rule: the empty intervention (what collect applies when
    none is asked for) binds nothing on PhiMoE, whose sparsemixer the kernel cannot reproduce."""
    import json

    from moelens import analysis
    from moelens.cli import main

    model, tokenizer = moelens.load("tiny:phimoe")
    with intervene(model, Intervention()), torch.no_grad():
        model(**tokenizer(PROMPTS[:1], return_tensors="pt"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": t, "kind": "code" if i % 2 else "prose"}) + "\n" for i, t in enumerate(PROMPTS * 2)))
    code = main(["collect", "tiny:phimoe", str(prompts), "--out", str(tmp_path / "s"), "--max-new-tokens", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    store = moelens.read_trace(tmp_path / "s")
    assert store.manifest.family == "phimoe" and len(store.prompts) == 2 * len(PROMPTS)
    assert len(analysis.ftri_scores(store, tag="kind", target="code", permutations=20)) > 0


# --- SCMoE ------------------------------------------------------------------------------------
def _two_pass_contrast(model, tokenizer, prompt, *, beta, alpha, steps):
    """Textbook SCMoE: two separate full forwards per step, no cache, one prompt at a time."""
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            strong = model(input_ids=ids).logits[0, -1].float()
            with intervene(model, rank(1)):
                weak = model(input_ids=ids).logits[0, -1].float()
        score = (1 + beta) * strong - beta * weak
        score[strong < strong.max() + math.log(alpha)] = -math.inf
        ids = torch.cat([ids, score.argmax().view(1, 1)], dim=1)
    return ids[0, -steps:]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_generate_contrast_matches_the_two_pass_implementation(family):
    model, tokenizer = moelens.load(f"tiny:{family}")
    prompts = PROMPTS[:3]
    output = generate_contrast(model, tokenizer, prompts, beta=0.5, alpha=0.1, max_new_tokens=6)
    for row, prompt in enumerate(prompts):
        expected = _two_pass_contrast(model, tokenizer, prompt, beta=0.5, alpha=0.1, steps=6).tolist()
        if tokenizer.eos_token_id in expected:  # after EOS the batched decoder pads
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert output.new_tokens[row].tolist()[: len(expected)] == expected


def test_generate_contrast_samples_repeatably_with_a_seeded_generator():
    from moelens.interventions.contrast import Sampling

    model, tokenizer = moelens.load("tiny:qwen3_moe")
    draws = [
        generate_contrast(model, tokenizer, PROMPTS[:2], max_new_tokens=4,
                          sampling=Sampling(temperature=2.0, generator=torch.Generator().manual_seed(seed))).new_tokens
        for seed in (0, 0)
    ]
    assert torch.equal(draws[0], draws[1])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Sampling(temperature=0.0)


def test_contrast_logits_by_hand():
    strong = torch.tensor([[2.0, 1.0, -5.0]])
    weak = torch.tensor([[1.0, 3.0, 0.0]])
    got = contrast_logits(strong, weak, beta=0.5, alpha=0.1)  # cutoff: 2 + ln 0.1 = -0.30
    assert got[0, 0] == pytest.approx(1.5 * 2 - 0.5 * 1) and got[0, 1] == pytest.approx(1.5 - 1.5) and got[0, 2] == -math.inf


# --- physical pruning -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe"])
def test_exported_pruned_checkpoint_matches_the_prune_intervention(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from moelens.interventions.export import export_pruned

    model, tokenizer = moelens.load(f"tiny:{family}")
    layers = moe_layers(model)
    if getattr(model.config, "n_group", 1) not in (None, 1):
        # group routing cannot be pruned physically: route without groups, in the config and in the live blocks
        model.config.n_group = model.config.topk_group = 1
        for layer in layers:
            layer.router.num_group = layer.router.topk_group = 1
    keep_count = max(layers[0].top_k, layers[0].num_experts // 2)
    kept = {layer.index: sorted(torch.randperm(layer.num_experts, generator=torch.Generator().manual_seed(layer.index))[:keep_count].tolist()) for layer in layers}
    spec = keep(kept)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), intervene(model, spec), moelens.trace(model) as masked:
        expected = model(**batch).logits
    export_pruned(model, tokenizer, spec, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad(), moelens.trace(reloaded) as physical:
        got = reloaded(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    remapped = physical.routes.copy()
    remapped["expert"] = [kept[layer][e] for layer, e in zip(remapped["layer"], remapped["expert"])]
    assert remapped["expert"].tolist() == masked.routes["expert"].tolist()


def test_export_refuses_unequal_or_partial_keep_lists(tmp_path):
    from moelens.interventions.export import export_pruned

    model, tokenizer = moelens.load("tiny:qwen2_moe")  # MoE layers 1 and 2
    with pytest.raises(SpecError, match=r"MoE layers \[2\] have no keep list"):
        export_pruned(model, tokenizer, keep({1: [0, 1, 2]}), tmp_path)
    with pytest.raises(SpecError, match=r"same number of experts.*\[3, 4\]"):
        export_pruned(model, tokenizer, keep({1: [0, 1, 2], 2: [0, 1, 2, 3]}), tmp_path)
    group_model, group_tokenizer = moelens.load("tiny:deepseek_v2")
    with pytest.raises(SpecError, match="routes within 4 expert groups"):
        export_pruned(group_model, group_tokenizer, keep({1: list(range(4)), 2: list(range(4))}), tmp_path)


def test_retired_disable_fields_are_read_from_version_1_only():
    old = {"interventions": [{"kind": "disable", "experts": {"1": [0]}, "mode": "drop", "renormalize": True, "tokens": "all"}]}
    assert Intervention.from_dict(old) == disable({1: [0]}, mode=Drop(renormalize=True))
    with pytest.raises(SpecError, match="unknown field"):
        Intervention.from_dict({"version": 2, **old})
