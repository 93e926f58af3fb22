"""Super experts, the profiling experts implementation and EASY-EP, against independent computations.

Ground truths: transformers' own eager experts (outputs), and brute-force loops over the fused
expert weights written here from the families' formulas, fed with what hooks saw the model's
router and MoE block receive in an ordinary forward pass.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from moelens.analysis import _profiling_experts as profiling
from moelens.analysis.easy_ep import combined_importance, expert_importance
from moelens.analysis.easy_ep import to_spec as easy_ep_spec
from moelens.analysis.easy_ep import top_experts as easy_ep_top_experts
from moelens.analysis.super_experts import (
    DropReport,
    SuperExpertOptions,
    detect_super_experts,
    drop_report,
    profile_super_experts,
    sink_decay,
    to_spec,
    top_experts,
)
from moelens.hooks.adapters import UnsupportedModelError, moe_layers
from tests.conftest import PROMPTS, _tiny


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a busy 2-core machine are ~50x slower with two competing threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Counter:
    def __init__(self) -> None:
        self.experts = 0

    def expert_output(self, expert, tokens, output, weights) -> None:
        self.experts += 1

    def routed_output(self, hidden_states, output) -> None:
        pass


def _batch(tokenizer, texts=PROMPTS):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


# --- (a) the implementation computes what eager computes and leaves the model as it was ------------
def test_profiling_experts_are_bitwise_eager_and_model_is_restored(tiny):
    model, tokenizer = tiny
    batch = _batch(tokenizer)
    before = model.config._experts_implementation
    with torch.no_grad():
        reference = model(**batch).logits
        model.set_experts_implementation("eager")
        try:
            eager = model(**batch).logits
        finally:
            model.set_experts_implementation(before)
        counters = {layer.experts: _Counter() for layer in moe_layers(model)}
        with profiling.profiling_experts(model, counters):
            profiled = model(**batch).logits
        after = model(**batch).logits
    assert torch.equal(profiled, eager)
    assert all(c.experts > 0 for c in counters.values())
    assert model.config._experts_implementation == before
    assert torch.equal(after, reference)


def test_model_is_restored_when_the_body_raises():
    model, tokenizer = _tiny("qwen2_moe")
    batch = _batch(tokenizer)
    before = model.config._experts_implementation
    with torch.no_grad():
        reference = model(**batch).logits
        with pytest.raises(KeyError, match="from the body"):
            with profiling.profiling_experts(model, {layer.experts: _Counter() for layer in moe_layers(model)}):
                model(**batch)
                raise KeyError("from the body")
        assert model.config._experts_implementation == before
        assert not profiling._OBSERVERS
        assert torch.equal(model(**batch).logits, reference)


def test_a_module_outside_the_experts_interface_is_refused():
    model, _ = _tiny("mixtral")
    with pytest.raises(UnsupportedModelError, match="experts interface"):
        with profiling.profiling_experts(model, {torch.nn.Linear(2, 2): _Counter()}):
            pass


def test_silent_experts_are_an_error():
    model, _ = _tiny("mixtral")
    with pytest.raises(profiling.ProfilingError, match="never ran"):
        with profiling.profiling_experts(model, {moe_layers(model)[0].experts: _Counter()}):
            pass  # no forward: the experts never run


# --- brute force from the weights ---------------------------------------------------------------
def _capture(model, batch):
    """What every MoE layer's block, router and residual norm received in an ordinary forward."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer in moe_layers(model):
        decoder_layer = model.get_submodule(layer.name.rsplit(".", 1)[0])

        def block_input(module, args, i=layer.index):
            seen[i, "h"] = args[0].reshape(-1, args[0].shape[-1])

        def residual(module, args, i=layer.index):
            seen[i, "x"] = args[0].reshape(-1, args[0].shape[-1])

        def router(module, args, output, i=layer.index):
            seen[i, "weights"], seen[i, "indices"] = output[1], output[2]

        handles += [
            layer.block.register_forward_pre_hook(block_input),
            decoder_layer.post_attention_layernorm.register_forward_pre_hook(residual),
            layer.router.register_forward_hook(router),
        ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _expert(experts, e, h):
    """Expert ``e`` of a fused experts module on rows ``h``, written from the family formulas."""
    if experts.is_transposed:  # GPT-OSS: interleaved gate/up, clamped, biased
        gate_up = h @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate = gate_up[:, 0::2].clamp(max=experts.limit)
        up = gate_up[:, 1::2].clamp(-experts.limit, experts.limit)
        glu = gate * torch.sigmoid(gate * experts.alpha)
        return ((up + 1) * glu) @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate, up = (h @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def _shared(mlp, h):
    return (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def _positions(batch):
    mask = batch["attention_mask"].bool()
    return torch.where(mask, mask.long().cumsum(1) - 1, -1).reshape(-1)  # [B*S], -1 on padding


# --- (b) max-output statistics -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_max_outputs_equal_a_brute_force_loop_over_the_weights(family):
    model, tokenizer = _tiny(family)
    texts = PROMPTS  # one batch of 3 + one of 1: padding in the first
    report = profile_super_experts(model, tokenizer, texts, options=SuperExpertOptions(batch_size=3, sinks=False))
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), 3):
            batch = _batch(tokenizer, texts[start : start + 3])
            seen = _capture(model, batch)
            position = _positions(batch)
            text = torch.arange(start, start + len(batch["input_ids"])).repeat_interleave(batch["input_ids"].shape[1])
            for layer in moe_layers(model):
                h, indices = seen[layer.index, "h"], seen[layer.index, "indices"]
                units = [(e, "routed") for e in range(layer.num_experts)] + ([(-1, "shared")] if layer.shared else [])
                for e, kind in units:
                    for t in range(len(h)):
                        if position[t] < 0 or (kind == "routed" and e not in indices[t].tolist()):
                            continue
                        row = h[t : t + 1]
                        out = (_expert(layer.experts, e, row) if kind == "routed" else _shared(layer.shared, row))[0]
                        rows.append(dict(
                            layer=layer.index, expert=e, value=out.abs().max().item(), channel=out.abs().argmax().item(),
                            text=text[t].item(), position=position[t].item(), call=start,
                            slot=indices[t].tolist().index(e) if kind == "routed" else 0, token=t,
                        ))
    brute = pd.DataFrame(rows)
    best = brute.loc[brute.groupby(["layer", "expert"])["value"].idxmax()].set_index(["layer", "expert"])
    first = brute[brute["position"] == 0].groupby(["layer", "expert"])["value"].max()
    ours = report.experts.set_index(["layer", "expert"])
    ran = ours[ours["tokens"] > 0]
    assert sorted(ran.index) == sorted(best.index)
    assert (ours.loc[ours["tokens"] == 0, "max_output"].isna()).all()
    np.testing.assert_allclose(ran["max_output"], best.loc[ran.index, "value"], rtol=1e-5)
    for column in ("channel", "text", "position"):
        assert ran[column].tolist() == best.loc[ran.index, column].tolist(), column
    assert ran["tokens"].tolist() == brute.groupby(["layer", "expert"]).size().loc[ran.index].tolist()
    on_first = ran["first_token_max"].dropna()
    assert sorted(on_first.index) == sorted(first.index)
    np.testing.assert_allclose(on_first, first.loc[on_first.index], rtol=1e-5)
    # the authors' output[0]: per forward call the first real row the expert processed; experts take their
    # rows slot by slot (tokens that chose them as top-1 first), in token order within a slot
    in_order = brute.sort_values(["layer", "expert", "call", "slot", "token"])
    first_rows = in_order.groupby(["layer", "expert", "call"]).first().groupby(["layer", "expert"])["value"].max()
    np.testing.assert_allclose(ran["first_row_max"], first_rows.loc[ran.index], rtol=1e-5)
    assert (ran["first_row_max"] <= ran["max_output"]).all() and (ran["first_row_max"] < ran["max_output"]).any()


# --- (c) a planted super expert -------------------------------------------------------------------
def test_a_planted_super_expert_is_detected_and_only_it():
    model, tokenizer = _tiny("qwen3_moe")
    model = copy.deepcopy(model)  # the fixture model is shared
    attention, experts_implementation = model.config._attn_implementation, model.config._experts_implementation
    clean = profile_super_experts(model, tokenizer, PROMPTS, options=SuperExpertOptions(batch_size=4, sinks=False))
    first_layer = moe_layers(model)[0]
    on_first_token = clean.experts.query("layer == @first_layer.index and first_token_max.notna()")
    planted = int(on_first_token["expert"].iloc[0])
    with torch.no_grad():
        first_layer.experts.down_proj[planted] *= 1000.0

    report = profile_super_experts(model, tokenizer, PROMPTS, options=SuperExpertOptions(batch_size=4))
    found = report.super_experts
    assert list(zip(found["layer"], found["expert"], found["kind"])) == [(first_layer.index, planted, "routed")]
    assert top_experts(report) == top_experts(report, 1) == {first_layer.index: [planted]}
    from moelens.interventions import Drop, disable

    assert to_spec(report).to_dict() == disable({first_layer.index: [planted]}, mode=Drop()).to_dict()
    assert found["max_output"].iloc[0] > 100 * clean.experts["max_output"].max()
    assert model.config._attn_implementation == attention
    assert model.config._experts_implementation == experts_implementation
    assert report.sinks["sink_mass"].between(0, 1).all() and len(report.sinks) == 3 * model.config.num_attention_heads

    dropped = drop_report(model, tokenizer, PROMPTS, report, seeds=(0, 1))
    assert isinstance(dropped, DropReport)
    assert dropped.runs["condition"].tolist() == ["baseline", "super", "random", "random"]
    assert dropped.runs["experts"].tolist() == [0, 1, 1, 1]
    assert dropped.runs.loc[0, ["delta_loss", "sink_decay"]].tolist() == [0.0, 0.0]
    assert dropped.dropped["super"] == {first_layer.index: [planted]}
    # dropping the planted expert removes the huge activations it wrote into the residual stream
    super_run = dropped.runs.set_index("condition").loc["super"]
    assert super_run["max_massive"] < dropped.runs.loc[0, "max_massive"] / 10


def test_massive_activations_and_sinks_equal_a_direct_reading():
    model, tokenizer = _tiny("mixtral")
    report = profile_super_experts(model, tokenizer, PROMPTS, options=SuperExpertOptions(batch_size=4, top_n=2))
    batch = _batch(tokenizer)
    outputs: dict[int, torch.Tensor] = {}
    decoder_layers = model.model.layers
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i, layer in
               enumerate(decoder_layers)]
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(attention)
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"].bool()
    first = [int(torch.nonzero(row)[0]) for row in mask]  # left padding: the first real column
    for i in range(len(decoder_layers)):
        ours = report.massive[report.massive["layer"] == i]
        h = outputs[i]
        everything = torch.cat([h[b, mask[b]].abs().flatten() for b in range(len(mask))])
        np.testing.assert_allclose(ours["magnitude"], everything.sort(descending=True).values[:2], rtol=1e-6)
        for row in ours.itertuples():
            real = h[row.text, mask[row.text]]  # [tokens, H]
            assert real[row.position, row.channel].item() == pytest.approx(row.value)
            assert real.abs().flatten().median().item() == pytest.approx(row.median)
        for head in range(model.config.num_attention_heads):
            on_first = [attentions[i][b, head, q, first[b]].item()
                        for b in range(len(mask)) for q in range(first[b] + 1, mask.shape[1])]
            measured = report.sinks.query("layer == @i and head == @head")["sink_mass"].item()
            assert measured == pytest.approx(np.mean(on_first), rel=1e-5)


def test_detection_rule_thresholds_and_layer_restriction():
    maxima = [1.0] * 396 + [50.0, 400.0, 2000.0, np.nan]  # 400 experts in 8 layers of 50
    layers, experts = np.repeat(np.arange(8), 50), np.tile(np.arange(50), 8)
    table = pd.DataFrame({"layer": layers, "expert": experts, "max_output": maxima})
    table.loc[396:, "layer"] = [0, 1, 7, 2]  # 2000 sits in the last layer, outside the first 75%
    flagged, thresholds = detect_super_experts(table, num_layers=8)
    # by hand, the authors' rule: kept layers 0-5 hold 300 x 1.0, 50 and 400 (and one NaN, an expert
    # that never ran): P99.5 of those 302 maxima, numpy's linear interpolation at index 0.995 x 301 =
    # 299.495 between the sorted values 1 and 50, = 1 + 0.495 x 49 = 25.255; max / 10 = 40; the 2000
    # of layer 7 is not in that set
    assert thresholds["max_layer"] == 6 and thresholds["fraction_value"] == 40.0
    assert thresholds["percentile_value"] == pytest.approx(25.255)
    assert flagged.loc[flagged["super"], "max_output"].tolist() == [50.0, 400.0]
    every_layer, _ = detect_super_experts(table, num_layers=8, options=SuperExpertOptions(layer_fraction=1.0))
    assert every_layer.loc[every_layer["super"], "max_output"].tolist() == [400.0, 2000.0]  # 50 < 2000 / 10
    loose, _ = detect_super_experts(
        table, num_layers=8, options=SuperExpertOptions(percentile=90, fraction_of_max=0.01, layer_fraction=1.0)
    )
    assert loose.loc[loose["super"], "max_output"].tolist() == [50.0, 400.0, 2000.0]


def test_the_authors_first_row_reading_is_an_option():
    """A planted extreme on the second routed row: all rows see it, the authors' output[0] reading does not."""
    table = pd.DataFrame({"layer": [0] * 300, "expert": range(300), "max_output": [1.0] * 300, "first_row_max": [1.0] * 300})
    table.loc[7, "max_output"] = 500.0  # only on a later row
    table.loc[9, ["max_output", "first_row_max"]] = 300.0  # on the first row as well
    all_rows, _ = detect_super_experts(table, num_layers=4)
    first_row, thresholds = detect_super_experts(table, num_layers=4, options=SuperExpertOptions(reading="first_row"))
    assert all_rows.loc[all_rows["super"], "expert"].tolist() == [7, 9]
    assert first_row.loc[first_row["super"], "expert"].tolist() == [9] and thresholds["reading"] == "first_row"
    with pytest.raises(ValueError, match="reading='last'"):
        SuperExpertOptions(reading="last")  # type: ignore[arg-type]


# --- (d) EASY-EP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_easy_ep_scores_equal_a_brute_force_computation(family):
    model, tokenizer = _tiny(family)
    domains = {"prose": PROMPTS[:1] + PROMPTS[3:], "code": PROMPTS[1:3]}
    table = expert_importance(model, tokenizer, domains, batch_size=2)

    expected = []
    for domain, texts in domains.items():
        batch = _batch(tokenizer, texts)
        seen = _capture(model, batch)
        real = _positions(batch) >= 0
        with torch.no_grad():
            for layer in moe_layers(model):
                h, x = seen[layer.index, "h"], seen[layer.index, "x"]
                weights, indices = seen[layer.index, "weights"], seen[layer.index, "indices"]
                score = torch.zeros(layer.num_experts, dtype=torch.float64)
                for t in torch.nonzero(real).flatten().tolist():
                    outs = [_expert(layer.experts, e, h[t : t + 1])[0] for e in indices[t].tolist()]
                    routed = sum(g * o for g, o in zip(weights[t], outs))
                    after = (x[t] + routed).double()  # the sum as the model forms it, the cosine in float64
                    cos = x[t].double() @ after / (x[t].double().norm() * after.norm())
                    for g, e, o in zip(weights[t], indices[t].tolist(), outs):
                        score[e] += float(g * o.norm() * max(0.0, 1 - cos.item()))
                expected += [dict(domain=domain, layer=layer.index, expert=e, brute=s)
                             for e, s in enumerate(score.tolist())]
    merged = table.merge(pd.DataFrame(expected), on=["domain", "layer", "expert"], validate="one_to_one")
    assert len(merged) == len(table)
    np.testing.assert_allclose(merged["score"], merged["brute"], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(table.groupby(["domain", "layer"])["normalised"].sum(), 1.0)

    top = combined_importance(table, 2)
    combined = table.groupby(["layer", "expert"])["normalised"].sum()
    for layer, group in top.groupby("layer"):
        assert group["combined"].tolist() == sorted(combined.loc[layer], reverse=True)[:2]
        assert group["place"].tolist() == [1, 2]
    assert easy_ep_top_experts(table, 2) == {l: sorted(g["expert"].tolist()) for l, g in top.groupby("layer")}
    spec = easy_ep_spec(table, 2).to_dict()["interventions"][0]
    assert spec["kind"] == "keep"
    assert spec["experts"] == {str(l): sorted(g["expert"].tolist()) for l, g in top.groupby("layer")}


def test_drop_and_keep_names_are_the_public_ones():
    """One vocabulary: dropping super experts is drop_report; EASY-EP's spec keeps experts (kind "keep")."""
    from moelens import analysis

    assert analysis.drop_report is drop_report and analysis.DropReport is DropReport
    assert analysis.easy_ep_spec is easy_ep_spec and analysis.super_experts_spec is to_spec
    assert analysis.easy_ep_top_experts is easy_ep_top_experts and analysis.super_experts_top_experts is top_experts
    assert not hasattr(analysis, "prune_report") and not hasattr(analysis, "PruneReport")


# --- (e) sink decay -------------------------------------------------------------------------------
def test_sink_decay_on_hand_made_numbers():
    assert sink_decay([0.5, 0.4], [0.25, 0.4]) == pytest.approx(0.25)  # 1 - mean(0.5, 1.0)
    assert sink_decay([[0.8, 0.2]], [[0.0, 0.0]]) == pytest.approx(1.0)
    assert sink_decay([0.5, 0.0], [0.75, 0.3]) == pytest.approx(-0.5)  # a head without sink mass is skipped
    with pytest.raises(ValueError, match="same shape"):
        sink_decay([0.5], [0.5, 0.5])


def test_super_expert_options_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        SuperExpertOptions(8)  # type: ignore[misc]
    with pytest.raises(ValueError, match="layer_fraction=0 is outside"):
        SuperExpertOptions(layer_fraction=0)
    with pytest.raises(TypeError):
        profile_super_experts(None, None, [], 8)  # type: ignore[misc]  # options are never positional
