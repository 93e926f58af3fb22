"""Nested ``intervene`` blocks act exactly like the combined spec, in either nesting order, with
row-scoped blocks, token-scoped parts and ``generate_contrast(strong=...)``.

Ground truths: what each layer's experts module received (hooks written here), rows traced one
prompt at a time, and a two-pass SCMoE written out by hand.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import moelens
from moelens.hooks.adapters import moe_layers
from moelens.interventions import Intervention, SpecError, active_intervention, disable, intervene, rank, reweight, top_k, top_p
from moelens.interventions.contrast import generate_contrast
from tests.conftest import PROMPTS
from tests.test_interventions import KERNEL_FAMILIES, _by_expert, _expert_inputs


def _received(model, batch, *specs):
    """(indices, weights) [T, k] each MoE layer's experts received under ``specs`` nested in order."""
    seen, handles = _expert_inputs(model)
    try:
        with torch.no_grad():
            blocks = [intervene(model, spec) for spec in specs]
            for block in blocks:
                block.__enter__()
            try:
                model(**batch)
            finally:
                for block in reversed(blocks):
                    block.__exit__(None, None, None)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: _by_expert(indices, weights) for layer, (indices, weights) in seen.items()}


def _two_experts(model, batch):
    """Layer, the expert most often chosen there (to disable) and the second (to reweight)."""
    layer = moe_layers(model)[0]
    indices, _ = _received(model, batch)[layer.index]
    busiest = torch.bincount(indices.flatten(), minlength=layer.num_experts).argsort(descending=True)
    return layer.index, int(busiest[0]), int(busiest[1])


@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_nested_blocks_equal_the_combined_spec_in_both_orders(family):
    model, tokenizer = moelens.load(f"tiny:{family}")
    batch = tokenizer(PROMPTS[1:2], return_tensors="pt")
    layer, e, f = _two_experts(model, batch)
    off, boost = disable({layer: [e]}), reweight({layer: [f]}, 2.0)
    combined = _received(model, batch, off + boost)
    plain_f = _received(model, batch, off)[layer]
    # the combined spec itself, by hand: e is never chosen; f weighs twice what it weighs without the boost
    indices, weights = combined[layer]
    assert not (indices == e).any() and (indices == f).any()
    torch.testing.assert_close(weights[indices == f], 2 * plain_f[1][plain_f[0] == f])
    assert combined
    for order in ((off, boost), (boost, off)):
        nested = _received(model, batch, *order)
        assert nested.keys() == combined.keys()
        for index, (got_indices, got_weights) in nested.items():
            assert torch.equal(got_indices, combined[index][0]), (order, index)
            torch.testing.assert_close(got_weights, combined[index][1])


def test_active_intervention_and_hooks_follow_the_blocks():
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    layer = moe_layers(model)[0]
    hooks = lambda: len(layer.router._forward_hooks)  # noqa: E731
    before = hooks()
    a, b = disable({layer.index: [0]}), reweight({layer.index: [1]}, 3.0)
    with intervene(model, a):
        with intervene(model, b):
            assert active_intervention(model) == a + b
            assert hooks() == before + 1  # one hook per router, whatever the nesting depth
        assert active_intervention(model) == a and hooks() == before + 1
    assert active_intervention(model) is None and hooks() == before


def test_a_conflicting_inner_block_is_refused_and_the_outer_one_stays():
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    batch = tokenizer(PROMPTS[1:2], return_tensors="pt")
    outer = top_p(0.5)
    expected = _received(model, batch, outer)
    with intervene(model, outer):
        with pytest.raises(SpecError, match="two different values for top_p"):
            with intervene(model, top_p(0.9)):
                pass
        assert active_intervention(model) == outer
    assert _received(model, batch, outer).keys() == expected.keys()


def test_prompt_and_generated_parts_never_conflict():
    model, _ = moelens.load("tiny:qwen3_moe")
    with intervene(model, top_p(0.5, tokens="prompt")), intervene(model, top_p(0.9, tokens="generated")):
        pass  # a token is either a prompt token or a generated one


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_a_row_scoped_block_inside_an_all_rows_block(family):
    """Rows of one batch: row 0 gets both specs, row 1 only the outer one (checked one prompt at a time)."""
    model, tokenizer = moelens.load(f"tiny:{family}")
    one = tokenizer(PROMPTS[1:2], return_tensors="pt")
    two = {name: tensor.repeat(2, 1) for name, tensor in one.items()}
    layer, e, f = _two_experts(model, one)
    outer, inner = reweight({layer: [f]}, 2.0), disable({layer: [e]})
    seen, handles = _expert_inputs(model)
    try:
        with torch.no_grad(), intervene(model, outer), intervene(model, inner, rows=slice(0, 1)):
            model(**two)
    finally:
        for handle in handles:
            handle.remove()
    tokens = one["input_ids"].shape[1]
    indices, weights = _by_expert(*seen[layer])
    for row, alone in ((0, _received(model, one, outer + inner)), (1, _received(model, one, outer))):
        assert torch.equal(indices[row * tokens : (row + 1) * tokens], alone[layer][0]), row
        torch.testing.assert_close(weights[row * tokens : (row + 1) * tokens], alone[layer][1])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_three_row_ranges_with_different_slot_counts(family):
    """One batch, three treatments: row 0 the family's routing, row 1 ``top_k(1)`` (fewer slots),
    row 2 a disable. Each row routes, and computes, as it does alone under its own spec."""
    model, tokenizer = moelens.load(f"tiny:{family}")
    one = tokenizer(PROMPTS[1:2], return_tensors="pt")
    three = {name: tensor.repeat(3, 1) for name, tensor in one.items()}
    layer, e, _ = _two_experts(model, one)
    specs = [Intervention(), top_k(1), disable({layer: [e]})]
    with torch.no_grad(), intervene(model, specs[1], rows=slice(1, 2)), intervene(model, specs[2], rows=slice(2, None)):
        with moelens.trace(model) as together:
            logits = model(**three).logits
    columns = ["position", "layer", "rank", "expert", "weight"]
    for row, spec in enumerate(specs):
        with torch.no_grad(), intervene(model, spec), moelens.trace(model) as alone:
            expected = model(**one).logits
        want = alone.routes[columns].reset_index(drop=True)
        assert len(want) > 0
        got = together.routes.query("prompt_id == @row")[columns].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits[row], expected[0], rtol=1e-4, atol=1e-5)
    assert together.routes.query("prompt_id == 1")["rank"].max() == 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_position_scoped_parts_route_each_position_as_its_spec_does(family):
    """Two positions that chose expert e disable it (the family's rule: one masked launch), another
    position gets ``top_k(1)`` (another rule: routed apart), the rest route as the family does.
    Checked at the first MoE layer, whose inputs no routing has changed yet, against each spec
    applied to every token."""
    model, tokenizer = moelens.load(f"tiny:{family}")
    batch = tokenizer(PROMPTS[1:2], return_tensors="pt")
    layer, e, _ = _two_experts(model, batch)
    assert layer == moe_layers(model)[0].index
    family_routing = _received(model, batch)[layer]
    disabled_at = [p for p in range(len(family_routing[0])) if e in family_routing[0][p]][:2]
    top_k_at = next(p for p in range(len(family_routing[0])) if p not in disabled_at)
    assert len(disabled_at) == 2
    got = _received(model, batch, disable({layer: [e]}, tokens=disabled_at) + top_k(1, tokens=[top_k_at]))[layer]
    disabled, top_1 = _received(model, batch, disable({layer: [e]}))[layer], _received(model, batch, top_k(1))[layer]
    for position in range(len(family_routing[0])):
        truth = disabled if position in disabled_at else top_1 if position == top_k_at else family_routing
        indices, weights = got[0][position], got[1][position]
        filled = weights != 0 if position == top_k_at else torch.ones_like(weights, dtype=torch.bool)  # a padded empty slot
        assert torch.equal(indices[filled].sort().values, truth[0][position].sort().values), position
        torch.testing.assert_close(weights[filled].sort().values, truth[1][position].sort().values)


def test_a_token_in_two_scopes_gets_both_parts():
    """disable(all) + reweight(generated): generated tokens get both, not only the reweight."""
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    batch = tokenizer(PROMPTS[1:2], return_tensors="pt")
    layer, e, f = _two_experts(model, batch)
    spec = disable({layer: [e]}) + reweight({layer: [f]}, 2.0, tokens="generated")
    with torch.no_grad(), intervene(model, spec), moelens.trace(model, end_token_ids=()) as tracer:
        model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    routes = tracer.routes.merge(tracer.tokens, on=["prompt_id", "position"]).query("layer == @layer")
    assert routes["generated"].any() and (~routes["generated"]).any()
    assert not (routes["expert"] == e).any()


def _two_pass_contrast(model, tokenizer, prompt, *, strong, weak, beta, alpha, steps):
    """Textbook SCMoE: two separate full forwards per step, no cache, one prompt at a time."""
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            with intervene(model, strong):
                strong_logits = model(input_ids=ids).logits[0, -1].float()
            with intervene(model, weak):
                weak_logits = model(input_ids=ids).logits[0, -1].float()
        score = (1 + beta) * strong_logits - beta * weak_logits
        score[strong_logits < strong_logits.max() + math.log(alpha)] = -math.inf
        ids = torch.cat([ids, score.argmax().view(1, 1)], dim=1)
    return ids[0, -steps:]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_generate_contrast_applies_the_strong_spec(family):
    model, tokenizer = moelens.load(f"tiny:{family}")
    strong = rank(2)  # a drastic strong routing: each token's third choice only (ranks count from 0)
    got = generate_contrast(model, tokenizer, PROMPTS[2:3], strong=strong, max_new_tokens=5).new_tokens[0].tolist()
    expected = _two_pass_contrast(model, tokenizer, PROMPTS[2], strong=strong, weak=rank(1), beta=0.5, alpha=0.1, steps=5).tolist()
    ignored = _two_pass_contrast(model, tokenizer, PROMPTS[2], strong=Intervention(), weak=rank(1), beta=0.5, alpha=0.1, steps=5).tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
    assert got[: len(expected)] == expected
    assert expected != ignored[: len(expected)], "the strong spec must change this generation for the test to mean anything"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_top_k_with_a_smaller_k_equals_the_familys_own_router_set_to_k(family):
    """SCMoE's other weak activation: the family's router itself, its top_k attribute set to 1, is the ground truth."""
    from moelens.interventions import top_k

    model, tokenizer = moelens.load(f"tiny:{family}")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].reshape(-1).bool()
    steered = _received(model, batch, top_k(1))
    routers = [layer.router for layer in moe_layers(model)]
    assert all(hasattr(router, "top_k") for router in routers)
    saved = [router.top_k for router in routers]
    try:
        for router in routers:
            router.top_k = 1
        own = _received(model, batch)
    finally:
        for router, k in zip(routers, saved):
            router.top_k = k
    assert own and steered.keys() == own.keys()
    for index, (indices, weights) in own.items():
        assert torch.equal(steered[index][0][real], indices[real]), index
        torch.testing.assert_close(steered[index][1][real], weights[real], rtol=1e-5, atol=1e-6)


def test_generate_contrast_can_ban_eos():
    model, tokenizer = moelens.load("tiny:qwen2_moe")
    eos = tokenizer.eos_token_id
    free = generate_contrast(model, tokenizer, PROMPTS[:1], max_new_tokens=8, alpha=1.0, beta=0.0)
    banned = generate_contrast(model, tokenizer, PROMPTS[:1], max_new_tokens=8, alpha=1.0, beta=0.0, ban_eos=True)
    assert eos in free.new_tokens[0].tolist(), "the tiny model must produce EOS unbanned for this test to mean anything"
    assert eos not in banned.new_tokens[0].tolist() and banned.new_tokens.shape[1] == 8


def test_one_definition_of_rank_for_traces_and_rank_r_on_deepseek_v3():
    """DeepSeek-V3 chooses by sigmoid(logit) + correction bias but weighs by sigmoid(logit) alone:
    a trace's rank r and rank(r) are both the (r + 1)-th expert in the choice order (both count from 0),
    computed here by hand."""
    model, tokenizer = moelens.load("tiny:deepseek_v3")
    layer = moe_layers(model)[0]
    batch = tokenizer(PROMPTS[1:2], return_tensors="pt")
    seen = {}
    handle = layer.router.register_forward_hook(lambda m, a, out: seen.update(logits=out[0].float(), indices=out[2]))
    try:
        with torch.no_grad(), moelens.trace(model) as tracer:
            model(**batch)
    finally:
        handle.remove()
    choice = torch.sigmoid(seen["logits"]) + layer.router.e_score_correction_bias.float()
    chosen = seen["indices"]
    expected = chosen.gather(1, choice.gather(1, chosen).argsort(dim=1, descending=True, stable=True))  # [T, k] by choice
    routes = tracer.routes.query("layer == @layer.index").sort_values(["position", "rank"])
    got = torch.tensor(routes["expert"].to_numpy().astype("int64")).view(len(expected), -1)
    assert torch.equal(got, expected)
    by_weight = routes.sort_values(["position", "weight"], ascending=[True, False], kind="stable")
    assert (by_weight["expert"].to_numpy() != routes["expert"].to_numpy()).any(), "weight and choice order must differ somewhere here"
    for r in range(layer.top_k):
        indices, _ = _received(model, batch, rank(r, layers=[layer.index]))[layer.index]
        assert torch.equal(indices[:, 0], expected[:, r]), r
        assert torch.equal(indices[:, 0], got[:, r]), r  # the trace's routes.rank r
