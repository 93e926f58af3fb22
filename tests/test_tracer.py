"""The tracer records exactly what each router returned: checked against independent hooks,
against the model's own ``output_router_logits``, and against single-prompt runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import moelens
from moelens.hooks.adapters import moe_layers
from tests.conftest import PROMPTS


def _reference_routes(model, batch) -> pd.DataFrame:
    """Routes read by hooks written here, independently of moelens: every router's raw output,
    unpadded with the attention mask, in choice order within each token (by weight, or where the
    router adds a correction bias for choice only, DeepSeek-V3's, by sigmoid(logit) + bias)."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        block = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")
        router = getattr(block, "gate", None) if hasattr(block, "experts") else None
        router = router if router is not None else getattr(block, "router", None)
        if router is None:
            continue

        def hook(module, args, output, index=index):
            bias = getattr(module, "e_score_correction_bias", None)
            key = output[1].float() if bias is None else (torch.sigmoid(output[0].float()) + bias).gather(1, output[2])
            captured[index] = (output[1].float(), output[2], key)

        handles.append(router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"].bool()
    rows = []
    batch_size, seq = mask.shape
    for layer, (weights, indices, key) in captured.items():
        weights = weights.view(batch_size, seq, -1)
        indices = indices.view(batch_size, seq, -1)
        key = key.view(batch_size, seq, -1)
        for b in range(batch_size):
            real_positions = torch.nonzero(mask[b]).flatten().tolist()
            for position, column in enumerate(real_positions):
                order = torch.argsort(key[b, column], descending=True, stable=True)
                for rank, slot in enumerate(order.tolist()):
                    rows.append((b, position, layer, rank, int(indices[b, column, slot]), float(weights[b, column, slot])))
    frame = pd.DataFrame(rows, columns=["prompt_id", "position", "layer", "rank", "expert", "weight"])
    return frame.sort_values(["prompt_id", "position", "layer", "rank"]).reset_index(drop=True)


def _as_plain(routes: pd.DataFrame) -> pd.DataFrame:
    out = routes.astype({"prompt_id": "int64", "position": "int64", "layer": "int64", "rank": "int64", "expert": "int64"})
    return out.sort_values(["prompt_id", "position", "layer", "rank"]).reset_index(drop=True)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_trace_equals_independent_router_hooks(tiny, padding_side):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side=padding_side)
    expected = _reference_routes(model, batch)
    with torch.no_grad(), moelens.trace(model) as tracer:
        model(**batch)
    got = _as_plain(tracer.routes)
    pd.testing.assert_frame_equal(got.drop(columns="weight"), expected.drop(columns="weight"))
    # weights are stored as float16: compare at float16 resolution
    np.testing.assert_allclose(got["weight"], expected["weight"], rtol=1e-3, atol=1e-4)
    assert set(got["layer"]) == {layer.index for layer in moe_layers(model)}


def test_full_logits_equal_output_router_logits(tiny):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(), moelens.trace(model, full_logits=True) as tracer:
        output = model(**batch, output_router_logits=True)
    own = getattr(output, "router_logits", None)
    if not own:
        pytest.skip(f"{model.config.model_type} does not return router logits")
    layers = [layer.index for layer in moe_layers(model)]
    recorded = tracer.logits
    assert len(own) == len(layers)
    for layer, logits in zip(layers, own):
        rows = recorded[recorded["layer"] == layer].sort_values("position")
        stored = np.stack(rows["logits"].to_numpy())
        np.testing.assert_allclose(stored, logits.float().view(-1, logits.shape[-1]).numpy(), rtol=2e-3, atol=2e-3)


def test_padded_batch_equals_prompts_alone(tiny):
    model, tokenizer = tiny
    with torch.no_grad(), moelens.trace(model) as batched:
        model(**tokenizer(PROMPTS, return_tensors="pt", padding=True))
    alone = []
    for prompt_id, prompt in enumerate(PROMPTS):
        with torch.no_grad(), moelens.trace(model, prompt_ids=[prompt_id]) as single:
            model(**tokenizer([prompt], return_tensors="pt"))
        alone.append(single.routes)
    got, expected = _as_plain(batched.routes), _as_plain(pd.concat(alone))
    pd.testing.assert_frame_equal(got.drop(columns="weight"), expected.drop(columns="weight"))
    np.testing.assert_allclose(got["weight"], expected["weight"], rtol=2e-3, atol=1e-3)


def test_generate_trace_matches_one_forward_over_the_generated_text(tiny):
    """Decode steps with a KV cache route like one forward pass over the same tokens."""
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    # EOS is an ordinary token here (rows that end early: tests/test_generation_steps.py)
    with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer, end_token_ids=()) as generated:
        sequences = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    tokens = generated.tokens
    assert tokens.groupby("prompt_id")["generated"].sum().tolist() == [4, 4]  # the 5th token is never fed back
    for prompt_id in (0, 1):
        own = tokens[tokens.prompt_id == prompt_id].sort_values("position")
        assert own["position"].tolist() == list(range(len(own)))
        assert not own["generated"].iloc[0] and own["generated"].iloc[-1]
        real = sequences[prompt_id][batch["attention_mask"][prompt_id].nonzero()[0, 0] :][:-1]
        assert own["token_id"].tolist() == real.tolist()
        with torch.no_grad(), moelens.trace(model, prompt_ids=[prompt_id]) as whole:
            model(input_ids=real[None], attention_mask=torch.ones_like(real)[None])
        got = _as_plain(generated.routes.query("prompt_id == @prompt_id"))
        expected = _as_plain(whole.routes)
        agree = (got[["position", "layer", "rank", "expert"]].to_numpy() == expected[["position", "layer", "rank", "expert"]].to_numpy()).all(axis=1)
        assert agree.mean() > 0.98, f"only {agree.mean():.1%} of routing events agree"
        np.testing.assert_allclose(got["weight"][agree], expected["weight"][agree], rtol=5e-3, atol=2e-3)


def test_hooks_removed_and_model_unchanged_even_when_the_body_raises(tiny):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
    hook_counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), moelens.trace(model):
            model(**batch)
            raise RuntimeError("boom")
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hook_counts
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_a_router_that_does_not_fire_is_an_error():
    model, tokenizer = moelens.load("tiny:mixtral")
    block = model.model.layers[1].mlp
    block.forward = lambda hidden_states: hidden_states  # like a hub kernel that bypasses the router
    with pytest.raises(moelens.TraceError, match=r"MoE layers \[1\] did not fire"):
        with torch.no_grad(), moelens.trace(model):
            model(**tokenizer(["hello"], return_tensors="pt"))


def test_nan_router_logits_name_the_layer():
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    with torch.no_grad():
        model.model.layers[2].mlp.gate.weight[0, 0] = float("nan")
    with pytest.raises(moelens.TraceError, match="MoE layer 2 contain NaN"):
        with torch.no_grad(), moelens.trace(model):
            model(**tokenizer(["hello"], return_tensors="pt"))


def test_a_block_without_forward_passes_is_an_error():
    model, _ = moelens.load("tiny:olmoe")
    with pytest.raises(moelens.TraceError, match="no forward pass"):
        with moelens.trace(model):
            pass


def test_tables_and_sql():
    model, tokenizer = moelens.load("tiny:deepseek_v3")
    with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as tracer:
        model(**tokenizer(PROMPTS, return_tensors="pt", padding=True))
    routes = tracer.routes
    config = model.config
    per_token = tracer.sql("SELECT prompt_id, position, layer, sum(weight) AS w, count(*) AS k FROM routes GROUP BY ALL")
    # DeepSeek-V3 renormalises then scales: every token's weights sum to routed_scaling_factor
    np.testing.assert_allclose(per_token["w"], config.routed_scaling_factor, rtol=2e-3)
    assert (per_token["k"] == config.num_experts_per_tok).all()
    # ranks are 0..k-1 per token, in the family's choice order (tests/test_stacking.py checks the order by hand)
    ranks = routes.groupby(["prompt_id", "position", "layer"])["rank"].apply(list)
    assert len(ranks) > 0 and all(r == list(range(config.num_experts_per_tok)) for r in ranks)
    assert tracer.tokens.loc[0, "token"] == tokenizer.bos_token


def test_tables_are_built_when_first_read_not_when_the_block_ends(monkeypatch):
    """The block's end only moves the steps to the host and checks them; the tables are built
    once, on first access (what keeps a notebook's traced forward close to a bare one)."""
    import moelens.tracer as tracer_module

    model, tokenizer = moelens.load("tiny:qwen3_moe")
    builds = []
    build = tracer_module._build_tables
    monkeypatch.setattr(tracer_module, "_build_tables", lambda tracer: builds.append(tracer) or build(tracer))
    with torch.no_grad(), moelens.trace(model) as tracer:
        model(**tokenizer(PROMPTS, return_tensors="pt", padding=True))
    assert builds == []
    routes, tokens, prompts = tracer.routes, tracer.tokens, tracer.prompts
    assert builds == [tracer] and len(routes) > 0 and len(tokens) > 0
    assert prompts["prompt_id"].tolist() == list(range(len(PROMPTS)))


def test_a_device_budget_moves_old_steps_to_the_host_and_keeps_the_trace(monkeypatch):
    """Long generations: past ``max_device_bytes`` the oldest condensed steps leave the device.

    This machine has no accelerator, so the test declares every tensor to be on one and counts the
    moves to the host; the budget logic is what is checked: held bytes stay within the budget plus
    one step, and the tables equal an unbounded trace's."""
    import moelens.tracer as tracer_module

    model, tokenizer = moelens.load("tiny:qwen3_moe")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    generate = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad(), moelens.trace(model, max_device_bytes=None) as unbounded:
        model.generate(**batch, **generate)
    moved = []
    monkeypatch.setattr(tracer_module, "_on_accelerator", lambda tensor: True)
    monkeypatch.setattr(tracer_module, "_to_host", lambda tensor: moved.append(tensor.numel()) or tensor.clone())
    budget = 4096
    with torch.no_grad(), moelens.trace(model, max_device_bytes=budget) as bounded:
        model.generate(**batch, **generate)
    largest_step = max(step_bytes for step_bytes in _step_bytes(bounded))
    assert moved and unbounded.peak_device_bytes == 0  # nothing counted on a CPU model
    assert bounded.peak_device_bytes <= budget + largest_step < sum(_step_bytes(bounded))
    pd.testing.assert_frame_equal(bounded.routes, unbounded.routes)
    pd.testing.assert_frame_equal(bounded.tokens, unbounded.tokens)


def _step_bytes(tracer):
    return [sum(t.numel() * t.element_size() for t in step.tensors.values()) for step in tracer._steps]


def test_asking_for_the_layout_before_any_prompt_does_not_fix_the_id_type():
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    tracer = moelens.trace(model, tokenizer=tokenizer, prompt_ids=["first", "second"])
    assert tracer.layout().prompt_id_type == "uint32"  # a guess before any prompt was met
    with torch.no_grad(), tracer:
        model(**tokenizer(PROMPTS[:2], return_tensors="pt", padding=True))
    assert tracer.layout().prompt_id_type == "string"
    assert sorted(tracer.routes["prompt_id"].unique()) == ["first", "second"]


@pytest.mark.parametrize("spec_name", ["top_k", "rank"])
def test_layers_steered_to_fewer_slots_are_traced_beside_full_layers(spec_name):
    """top_k / rank on chosen layers give those layers fewer slots than the others in the same step."""
    from moelens.interventions import rank, top_k

    model, tokenizer = moelens.load("tiny:qwen3_moe")
    steered_layer = max(layer.index for layer in moe_layers(model))
    spec = top_k(1, layers=[steered_layer]) if spec_name == "top_k" else rank(1, layers=[steered_layer])
    received = {}

    def record(layer_index):
        def hook(module, args, kwargs):
            received[layer_index] = kwargs.get("top_k_index", args[1] if len(args) > 1 else None).clone()
        return hook

    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with moelens.intervene(model, spec):
        handles = [layer.experts.register_forward_pre_hook(record(layer.index), with_kwargs=True) for layer in moe_layers(model)]
        try:
            with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as tracer:
                model(**batch)
        finally:
            for handle in handles:
                handle.remove()
    assert received and received[steered_layer].shape[-1] == 1
    per_token = tracer.routes.groupby(["prompt_id", "position", "layer"]).size().groupby("layer").unique()
    assert list(per_token[steered_layer]) == [1]
    assert all(list(counts) == [model.config.num_experts_per_tok] for layer, counts in per_token.items() if layer != steered_layer)
    real = batch["attention_mask"].reshape(-1).bool()
    expected = received[steered_layer].reshape(-1, 1)[real, 0]
    got = tracer.routes.query("layer == @steered_layer").sort_values(["prompt_id", "position"])["expert"].to_numpy()
    assert sorted(got.tolist()) == sorted(expected.tolist())
