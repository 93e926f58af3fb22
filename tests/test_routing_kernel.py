"""The masked-routing function: torch path and Triton kernel vs the reference, families' own routers, planted
semantics, validation errors.

The Triton kernel runs under the interpreter on CPU; TRITON_INTERPRET must be set before triton is imported,
hence at the top of this module (moelens imports triton only inside kernels/triton_routing.py).
"""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from moelens.kernels.routing import (
    DropWeights,
    MultiplyWeights,
    RankSelect,
    RoutingControls,
    RoutingRule,
    TopKSelect,
    TopPSelect,
    num_slots,
    route,
)

# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def triton_available() -> None:
    pytest.importorskip("triton", reason="triton is not installed (pip install 'moelens[triton]')")


@pytest.fixture(params=["torch", "triton"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "triton":
        request.getfixturevalue("triton_available")
    return request.param


def _family_rule(family: str, num_experts: int, top_k: int) -> RoutingRule:
    """The rule of each family kind; DeepSeek groups sized so that top_k slots can always be filled."""
    if family in ("deepseek_v2", "deepseek_v3"):
        n_group = 8 if num_experts >= 64 else 4
        topk_group = n_group // 2 if n_group // 2 * (num_experts // n_group) >= top_k else n_group
        if family == "deepseek_v2":
            return RoutingRule(top_k, "softmax", scaling=16.0, n_group=n_group, topk_group=topk_group)
        return RoutingRule(
            top_k, "sigmoid", renormalize=True, scaling=2.5, n_group=n_group, topk_group=topk_group,
            group_score="top2_sum",
        )
    return {
        "mixtral": RoutingRule(top_k, "softmax", renormalize=True),
        "qwen_raw": RoutingRule(top_k, "softmax"),
        "gpt_oss": RoutingRule(top_k, "softmax", select_before_score=True),
        "llama4": RoutingRule(top_k, "sigmoid", select_before_score=True),
        "kolibri": RoutingRule(top_k, "sigmoid", select_before_score=True, renormalize=True),  # + a bias on the logits
        "deepseek_v4": RoutingRule(top_k, "sqrtsoftplus", renormalize=True, scaling=1.5),  # + a correction bias
    }[family]


FAMILIES = ["mixtral", "qwen_raw", "gpt_oss", "llama4", "kolibri", "deepseek_v2", "deepseek_v3", "deepseek_v4"]
BIASED = ("deepseek_v3", "kolibri", "deepseek_v4")  # families routed with a choice-only correction bias
CONTROL_KINDS = [
    "none", "bias", "disable", "force", "drop", "drop_renorm", "multiplier", "multiplier_renorm",
    "top_p", "top_p_renorm", "rank", "masked_disable", "combined",
]


def _mask(num: int, count: int, gen: torch.Generator) -> Tensor:
    mask = torch.zeros(num, dtype=torch.bool)
    mask[torch.randperm(num, generator=gen)[:count]] = True
    return mask


def _controls(kind: str, num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> RoutingControls | None:
    quarter = max(1, num_experts // 4)
    n_force = max(1, top_k // 2)
    factors = torch.rand(num_experts, generator=gen) * 4 + 0.25
    return {
        "none": lambda: None,
        "bias": lambda: RoutingControls(logit_bias=torch.randn(num_experts, generator=gen) * 2),
        "disable": lambda: RoutingControls(disable=_mask(num_experts, quarter, gen)),
        "force": lambda: RoutingControls(select=TopKSelect(force=_mask(num_experts, n_force, gen))),
        "drop": lambda: RoutingControls(drop=DropWeights(_mask(num_experts, quarter, gen))),
        "drop_renorm": lambda: RoutingControls(drop=DropWeights(_mask(num_experts, quarter, gen), renormalize=True)),
        "multiplier": lambda: RoutingControls(multiplier=MultiplyWeights(factors)),
        "multiplier_renorm": lambda: RoutingControls(multiplier=MultiplyWeights(factors, renormalize=True)),
        "top_p": lambda: RoutingControls(select=TopPSelect(0.4, max_k=min(num_experts, 2 * top_k))),
        "top_p_renorm": lambda: RoutingControls(select=TopPSelect(0.7, renormalize=True)),
        "rank": lambda: RoutingControls(select=RankSelect(min(1, num_experts - 1))),  # the second choice
        "masked_disable": lambda: RoutingControls(disable=_mask(num_experts, quarter, gen)),  # + a token mask (_case)
        "combined": lambda: RoutingControls(
            logit_bias=torch.randn(num_experts, generator=gen),
            disable=_mask(num_experts, quarter, gen) & ~(force := _mask(num_experts, n_force, gen)),
            select=TopKSelect(force=force),
            drop=DropWeights(_mask(num_experts, quarter, gen)),
            multiplier=MultiplyWeights(factors, renormalize=True),
        ),
    }[kind]()


def _case(family: str, kind: str, num_experts: int, top_k: int, num_tokens: int, seed: int = 0):
    """(logits, rule, route's keyword arguments: correction_bias, controls, token_mask)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    rule = _family_rule(family, num_experts, top_k)
    correction_bias = torch.randn(num_experts, generator=gen) * 0.3 if family in BIASED else None
    controls = _controls(kind, num_tokens, num_experts, top_k, gen)
    token_mask = torch.rand(num_tokens, generator=gen) < 0.5 if kind.startswith("masked_") else None
    return logits, rule, {"correction_bias": correction_bias, "controls": controls, "token_mask": token_mask}


def _assert_same_routing(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor]) -> None:
    torch.testing.assert_close(got[1], want[1], msg=lambda m: f"indices differ: {m}")
    torch.testing.assert_close(got[0], want[0], msg=lambda m: f"weights differ: {m}")


# ------------------------------------------------------------------ (a) implementations vs the reference

# (E, k, T): every family x control kind gets one, rotating so that each family sees every shape.
SHAPES = [(8, 1, 1), (64, 2, 7), (256, 8, 300), (8, 2, 300), (64, 8, 7), (256, 1, 7)]
GRID = [
    pytest.param(family, kind, e, k, t, id=f"{family}-{kind}-E{e}-k{k}-T{t}")
    for f, family in enumerate(FAMILIES)
    for c, kind in enumerate(CONTROL_KINDS)
    for e, k, t in [SHAPES[(f + c) % len(SHAPES)]]
]
LARGE = [  # E = 512, k = 16 once per selection mode
    pytest.param(family, kind, 512, 16, 64, id=f"{family}-{kind}-E512-k16-T64")
    for family, kind in [("mixtral", "none"), ("deepseek_v3", "combined"), ("qwen_raw", "top_p")]
]


@pytest.mark.parametrize(("family", "kind", "num_experts", "top_k", "num_tokens"), GRID + LARGE)
def test_matches_reference(impl: str, family: str, kind: str, num_experts: int, top_k: int, num_tokens: int) -> None:
    logits, rule, options = _case(family, kind, num_experts, top_k, num_tokens)
    want = route(logits, rule, **options, impl="reference")
    got = route(logits, rule, **options, impl=impl)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    masked = options["token_mask"] is not None
    assert got[0].shape == (num_tokens, num_slots(rule, options["controls"], num_experts, masked=masked))
    _assert_same_routing(got, want)


@pytest.mark.parametrize("kind", CONTROL_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_path_matches_reference_on_every_shape(family: str, kind: str) -> None:
    """The torch path is cheap enough for the full E x k cross product, at decode (T=1) and prefill sizes."""
    for num_experts in (8, 64, 256):
        for top_k in (1, 2, 8):
            for num_tokens in (1, 300):
                logits, rule, options = _case(family, kind, num_experts, top_k, num_tokens, seed=top_k)
                want = route(logits, rule, **options, impl="reference")
                _assert_same_routing(route(logits, rule, **options, impl="torch"), want)


@pytest.mark.parametrize("kind", ["none", "disable", "force", "masked_disable"])
@pytest.mark.parametrize("top_k", [1, 2], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_torch_path_arg_max_selection_on_many_tokens(family: str, top_k: int, kind: str) -> None:
    """k <= 2 on many tokens selects by arg-max passes instead of torch.topk."""
    logits, rule, options = _case(family, kind, 64, top_k, 1024)
    want = route(logits, rule, **options, impl="reference")
    _assert_same_routing(route(logits, rule, **options, impl="torch"), want)


def test_controls_object_reused_across_calls(impl: str) -> None:
    """Controls are validated and prepared once per object; later calls (other token counts) still match."""
    logits, rule, options = _case("deepseek_v3", "combined", 64, 8, 40)
    controls = options["controls"]
    first = route(logits, rule, controls=controls, impl=impl)
    again = route(logits[:3], rule, controls=controls, impl=impl)
    _assert_same_routing(again, (first[0][:3], first[1][:3]))


def test_bf16_logits_and_strided_input(impl: str) -> None:
    logits, rule, options = _case("mixtral", "combined", 64, 8, 33)
    controls = options["controls"]
    wide = torch.randn(33, 128).bfloat16()
    wide[:, ::2] = logits.bfloat16()
    strided = wide[:, ::2]  # [T, E] with a column stride of 2
    want = route(strided.contiguous(), rule, controls=controls, impl="reference")
    _assert_same_routing(route(strided, rule, controls=controls, impl=impl), want)


# ------------------------------------------------------------ (b) no controls == the family's own router


@dataclass(frozen=True)
class Family:
    module: str  # transformers.models.<module>.modeling_<module>
    config: str
    router: str
    experts_key: str  # the config field holding the number of routed experts
    rule: Callable[[object], RoutingRule]
    sorted: bool = True  # False: the family's top-k is sorted=False, compare index sets per token
    config_kwargs: tuple[tuple[str, object], ...] = ()


HF_FAMILIES = {
    "mixtral": Family("mixtral", "MixtralConfig", "MixtralTopKRouter", "num_local_experts",
                      lambda c: RoutingRule(c.num_experts_per_tok, "softmax", renormalize=True)),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeTopKRouter", "num_experts",
                        lambda c: RoutingRule(c.num_experts_per_tok, "softmax", renormalize=c.norm_topk_prob)),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeTopKRouter", "num_experts",
                        lambda c: RoutingRule(c.num_experts_per_tok, "softmax", renormalize=c.norm_topk_prob),
                        config_kwargs=(("norm_topk_prob", True),)),
    "olmoe": Family("olmoe", "OlmoeConfig", "OlmoeTopKRouter", "num_experts",
                    lambda c: RoutingRule(c.num_experts_per_tok, "softmax", renormalize=c.norm_topk_prob)),
    "jamba": Family("jamba", "JambaConfig", "JambaTopKRouter", "num_experts",
                    lambda c: RoutingRule(c.num_experts_per_tok, "softmax")),
    "gpt_oss": Family("gpt_oss", "GptOssConfig", "GptOssTopKRouter", "num_local_experts",
                      lambda c: RoutingRule(c.num_experts_per_tok, "softmax", select_before_score=True)),
    "granitemoe": Family("granitemoe", "GraniteMoeConfig", "GraniteMoeTopKRouter", "num_local_experts",
                         lambda c: RoutingRule(c.num_experts_per_tok, "softmax", select_before_score=True)),
    "llama4": Family("llama4", "Llama4TextConfig", "Llama4Router", "num_local_experts",
                     lambda c: RoutingRule(c.num_experts_per_tok, "sigmoid", select_before_score=True),
                     config_kwargs=(("num_experts_per_tok", 2),)),
    "kolibri1": Family("kolibri1", "Kolibri1Config", "Kolibri1TopKRouter", "num_experts",
                       lambda c: RoutingRule(c.num_experts_per_tok, "sigmoid", select_before_score=True, renormalize=True),
                       config_kwargs=(("norm_topk_prob", True),)),  # the correction bias is added to the raw logits
    "deepseek_v2_greedy": Family(
        "deepseek_v2", "DeepseekV2Config", "DeepseekV2TopkRouter", "n_routed_experts",
        lambda c: RoutingRule(c.num_experts_per_tok, "softmax", scaling=c.routed_scaling_factor),
        sorted=False, config_kwargs=(("num_experts_per_tok", 6), ("routed_scaling_factor", 16.0)),
    ),
    "deepseek_v2_groups": Family(
        "deepseek_v2", "DeepseekV2Config", "DeepseekV2TopkRouter", "n_routed_experts",
        lambda c: RoutingRule(c.num_experts_per_tok, "softmax", scaling=c.routed_scaling_factor,
                              n_group=c.n_group, topk_group=c.topk_group),
        sorted=False,
        config_kwargs=(("num_experts_per_tok", 6), ("topk_method", "group_limited_greedy"), ("n_group", 8),
                       ("topk_group", 3), ("routed_scaling_factor", 16.0)),
    ),
    "deepseek_v3": Family(
        "deepseek_v3", "DeepseekV3Config", "DeepseekV3TopkRouter", "n_routed_experts",
        lambda c: RoutingRule(c.num_experts_per_tok, "sigmoid", renormalize=c.norm_topk_prob,
                              scaling=c.routed_scaling_factor, n_group=c.n_group, topk_group=c.topk_group,
                              group_score="top2_sum"),
        sorted=False,
    ),
    "deepseek_v4": Family(
        "deepseek_v4", "DeepseekV4Config", "DeepseekV4TopKRouter", "num_local_experts",
        lambda c: RoutingRule(c.num_experts_per_tok, "sqrtsoftplus", renormalize=True, scaling=c.routed_scaling_factor),
        sorted=False,
    ),
}


def _hf_router(name: str, num_experts: int) -> tuple[torch.nn.Module, RoutingRule, Tensor | None]:
    import importlib

    import transformers

    family = HF_FAMILIES[name]
    modeling = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    config = getattr(transformers, family.config)(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, **{family.experts_key: num_experts},
        **dict(family.config_kwargs),
    )
    torch.manual_seed(0)
    router = getattr(modeling, family.router)(config).eval()
    for tensor in [*router.parameters(), *router.buffers()]:
        tensor.data.normal_(0, 0.5)  # random weights; also GPT-OSS's bias and DeepSeek-V3's correction bias
    correction_bias = getattr(router, "e_score_correction_bias", None)
    return router, family.rule(config), correction_bias


@pytest.mark.parametrize("num_experts", [64, 256], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("name", list(HF_FAMILIES))
@pytest.mark.parametrize("route_impl", ["reference", "torch", "triton"])
def test_reproduces_family_router(request: pytest.FixtureRequest, route_impl: str, name: str, num_experts: int) -> None:
    if route_impl == "triton":
        request.getfixturevalue("triton_available")
    router, rule, correction_bias = _hf_router(name, num_experts)
    hidden = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = router(hidden)
    weights, indices = route(
        out[0] if name != "llama4" else out[1], rule, correction_bias=correction_bias, impl=route_impl
    )
    if name == "llama4":  # Llama-4 returns dense [T, E] scores: sigmoid of the top-k logits, 0 elsewhere
        dense = torch.zeros(50, num_experts).scatter_(1, indices, weights)
        torch.testing.assert_close(dense, out[0].float())
        return
    want_weights, want_indices = out[1].float(), out[2]
    if not HF_FAMILIES[name].sorted:
        order, want_order = indices.argsort(dim=-1), want_indices.argsort(dim=-1)
        weights, indices = weights.gather(1, order), indices.gather(1, order)
        want_weights, want_indices = want_weights.gather(1, want_order), want_indices.gather(1, want_order)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(weights, want_weights)


# --------------------------------------------------------------------------- (c) planted semantics

SOFTMAX_RENORM = RoutingRule(2, "softmax", renormalize=True)
PLANTED_LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])  # expert e has rank e (0 = the first choice)


def _softmax_of(*logits: float) -> list[float]:
    return torch.softmax(torch.tensor(logits), dim=0).tolist()


def _planted(impl: str, **controls) -> tuple[list[float], list[int]]:
    weights, indices = route(PLANTED_LOGITS, SOFTMAX_RENORM, controls=RoutingControls(**controls), impl=impl)
    return weights[0].tolist(), indices[0].tolist()


def _bools(num: int, *on: int) -> Tensor:
    return torch.isin(torch.arange(num), torch.tensor(on))


def test_planted_disable_reroutes_to_next_best(impl: str) -> None:
    weights, indices = _planted(impl, disable=_bools(5, 0))
    assert indices == [1, 2]
    assert weights == pytest.approx(_softmax_of(3.0, 2.0))


def test_planted_force_takes_last_slot(impl: str) -> None:
    weights, indices = _planted(impl, select=TopKSelect(force=_bools(5, 4)))
    assert indices == [0, 4]
    assert weights == pytest.approx(_softmax_of(4.0, 0.0))


def test_planted_forced_expert_already_chosen_moves_last(impl: str) -> None:
    assert _planted(impl, select=TopKSelect(force=_bools(5, 0)))[1] == [1, 0]


def test_planted_drop_zeroes_weight_and_optionally_renormalizes(impl: str) -> None:
    kept = _softmax_of(4.0, 3.0)[1]
    assert _planted(impl, drop=DropWeights(_bools(5, 0))) == (pytest.approx([0.0, kept]), [0, 1])
    assert _planted(impl, drop=DropWeights(_bools(5, 0), renormalize=True)) == (pytest.approx([0.0, 1.0]), [0, 1])


def test_planted_multiplier(impl: str) -> None:
    top = _softmax_of(4.0, 3.0)
    factor = torch.ones(5).index_fill_(0, torch.tensor([1]), 64.0)
    assert _planted(impl, multiplier=MultiplyWeights(factor))[0] == pytest.approx([top[0], top[1] * 64])
    renormalized = [top[0] / (top[0] + 64 * top[1]), 64 * top[1] / (top[0] + 64 * top[1])]
    assert _planted(impl, multiplier=MultiplyWeights(factor, renormalize=True))[0] == pytest.approx(renormalized)


def test_planted_rank_one_routes_to_the_second_choice_with_weight_one(impl: str) -> None:
    assert _planted(impl, select=RankSelect(1)) == ([1.0], [1])
    assert _planted(impl, select=RankSelect(1), disable=_bools(5, 1)) == ([1.0], [2])


def test_planted_rank_counts_from_zero(impl: str) -> None:
    """RankSelect(r) is the trace's routes.rank r: 0 = the router's first choice."""
    assert _planted(impl, select=RankSelect(0)) == ([1.0], [0])
    assert _planted(impl, select=RankSelect(0), disable=_bools(5, 0)) == ([1.0], [1])


def test_rank_weight_is_the_familys_routed_scale(impl: str) -> None:
    """DeepSeek's top-k weights sum to routed_scaling_factor: its one weak expert gets that factor."""
    scaled = RoutingRule(2, "sigmoid", renormalize=True, scaling=2.5)
    weights, indices = route(PLANTED_LOGITS, scaled, controls=RoutingControls(select=RankSelect(1)), impl=impl)
    assert (weights[0].tolist(), indices[0].tolist()) == ([2.5], [1])
    assert route(PLANTED_LOGITS, scaled, impl=impl)[0].sum().item() == pytest.approx(2.5)  # the family's own scale


@pytest.mark.parametrize(
    ("p", "kept"), [(0.4, [0]), (0.6, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])], ids=lambda v: str(v)
)
def test_planted_top_p_keeps_smallest_prefix_above_p(impl: str, p: float, kept: list[int]) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor([[math.log(q) for q in probs]])
    rule = RoutingRule(2, "softmax", renormalize=True)
    weights, indices = route(logits, rule, controls=RoutingControls(select=TopPSelect(p, max_k=4)), impl=impl)
    assert indices[0].tolist() == kept + [4] * (4 - len(kept))  # empty slots hold the sentinel E = 4
    assert weights[0].tolist() == pytest.approx(probs[: len(kept)] + [0.0] * (4 - len(kept)))  # raw probabilities


def test_top_p_has_no_cap_by_default(impl: str) -> None:
    """Dynamic-MoE's top-p has no cap: on flat-ish logits over 64 experts it takes many more than
    top-k experts, exactly the smallest prefix (in probability order) whose mass exceeds p, by numpy."""
    import numpy as np

    logits = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * 0.8
    rule = RoutingRule(2, "softmax", renormalize=True)
    weights, indices = route(logits, rule, controls=RoutingControls(select=TopPSelect(0.9)), impl=impl)
    assert indices.shape[1] == 64  # room for every expert
    probs = np.exp(logits.double().numpy())
    probs /= probs.sum(axis=1, keepdims=True)
    ordered = np.sort(probs, axis=1)[:, ::-1]
    expected = (np.cumsum(ordered, axis=1) < 0.9).sum(axis=1) + 1  # experts before the mass reaches p, plus the one that crosses it
    kept = (indices < 64).sum(dim=1).numpy()
    np.testing.assert_array_equal(kept, expected)
    assert kept.mean() > 20  # far above top-k = 2
    capped = route(logits, rule, controls=RoutingControls(select=TopPSelect(0.9, max_k=2)), impl=impl)[1]
    assert capped.shape[1] == 2 and (capped < 64).all()


def test_top_p_weights_on_a_sigmoid_family_keep_its_scale(impl: str) -> None:
    """DeepSeek-V3-like rule (sigmoid scores, correction bias for choice, routed scale 2.5): each
    top-p weight is the expert's share of the sigmoid mass x 2.5, so a token's weights sum to its
    prefix mass x 2.5 (between p x 2.5 and 2.5), the family's own scale; by numpy."""
    import numpy as np

    generator = torch.Generator().manual_seed(1)
    logits, bias = torch.randn(64, 32, generator=generator), torch.randn(32, generator=generator) * 0.1
    rule = RoutingRule(8, "sigmoid", renormalize=True, scaling=2.5)
    weights, indices = route(logits, rule, correction_bias=bias, controls=RoutingControls(select=TopPSelect(0.9)), impl=impl)
    sig = 1 / (1 + np.exp(-logits.double().numpy()))
    share = sig / sig.sum(axis=1, keepdims=True)
    order = np.argsort(-(sig + bias.double().numpy()), axis=1, kind="stable")
    for t in range(len(logits)):
        mass = np.cumsum(share[t, order[t]])
        n = int((mass < 0.9).sum()) + 1
        kept = indices[t][indices[t] < 32].tolist()
        assert kept == order[t, :n].tolist()
        np.testing.assert_allclose(weights[t, :n].double().numpy(), 2.5 * share[t, order[t, :n]], rtol=1e-4)
    totals = weights.sum(dim=1)
    assert (totals >= 0.9 * 2.5 - 1e-4).all() and (totals <= 2.5 + 1e-4).all()


def test_planted_token_mask_leaves_other_tokens_untouched(impl: str) -> None:
    logits = PLANTED_LOGITS.expand(2, -1)
    controls = RoutingControls(disable=_bools(5, 0), select=RankSelect(0))
    weights, indices = route(logits, SOFTMAX_RENORM, controls=controls, token_mask=torch.tensor([True, False]), impl=impl)
    assert indices.tolist() == [[1, 5], [0, 1]]  # K = top_k: the masked token's second slot is empty
    assert weights[0].tolist() == [1.0, 0.0]
    assert weights[1].tolist() == pytest.approx(_softmax_of(4.0, 3.0))


def test_planted_disabling_all_but_one_leaves_empty_slots(impl: str) -> None:
    weights, indices = _planted(impl, disable=~_bools(5, 3))
    assert indices == [3, 5]
    assert weights == pytest.approx([1.0, 0.0])


def test_planted_forced_expert_bypasses_groups(impl: str) -> None:
    rule = RoutingRule(2, "sigmoid", renormalize=True, n_group=2, topk_group=1, group_score="top2_sum")
    logits = torch.tensor([[3.0, 2.0, -1.0, -2.0]])  # group 0 = experts {0, 1} wins
    assert route(logits, rule, impl=impl)[1].tolist() == [[0, 1]]
    assert route(logits, rule, controls=RoutingControls(select=TopKSelect(force=_bools(4, 3))), impl=impl)[1].tolist() == [[0, 3]]


# --------------------------------------------------------------------------- (d) validation errors

E = 8
RULE = RoutingRule(2, "softmax", renormalize=True)


@pytest.mark.parametrize(
    ("controls", "error", "match"),
    [
        pytest.param(
            RoutingControls(select=TopKSelect(force=_bools(E, 0, 1, 2))),
            ValueError, "force selects 3 experts.*top_k=2", id="force-more-than-k",
        ),
        pytest.param(
            RoutingControls(select=TopKSelect(force=_bools(E, 1)), disable=_bools(E, 1, 2)),
            ValueError, r"experts \[1\] are both forced and disabled", id="force-and-disable",
        ),
        pytest.param(
            RoutingControls(disable=torch.ones(E, dtype=torch.bool)),
            ValueError, "disable masks all 8 experts", id="disable-all",
        ),
        pytest.param(
            RoutingControls(multiplier=MultiplyWeights(torch.tensor([1.0] * 7 + [0.0]))),
            ValueError, r"multiplier must be finite and > 0.*experts \[7\]", id="multiplier-zero",
        ),
        pytest.param(
            RoutingControls(multiplier=MultiplyWeights(-torch.ones(E))),
            ValueError, "multiplier must be finite and > 0", id="multiplier-negative",
        ),
        pytest.param(
            RoutingControls(select=TopPSelect(0.0)), ValueError, r"TopPSelect p=0.0 is outside \(0, 1\]", id="top-p-zero",
        ),
        pytest.param(
            RoutingControls(select=TopPSelect(1.5)), ValueError, r"TopPSelect p=1.5 is outside \(0, 1\]",
            id="top-p-above-one",
        ),
        pytest.param(
            RoutingControls(select=TopPSelect(0.5, max_k=9)),
            ValueError, r"TopPSelect max_k=9 is outside \[1, 8\]", id="top-p-max-k",
        ),
        pytest.param(
            RoutingControls(select=RankSelect(8)), ValueError,
            r"RankSelect rank=8 is outside \[0, 7\]; rank r counts from 0 \(0 = the router's first choice\)", id="rank-above-E",
        ),
        pytest.param(
            RoutingControls(select=RankSelect(-1)), ValueError, r"RankSelect rank=-1 is outside \[0, 7\]", id="rank-negative",
        ),
        pytest.param(
            RoutingControls(logit_bias=torch.zeros(E + 1)),
            ValueError, r"logit_bias must be a tensor of shape \(8,\)", id="wrong-length",
        ),
        pytest.param(
            RoutingControls(disable=torch.zeros(E)),
            TypeError, "disable must be a bool tensor", id="mask-not-bool",
        ),
        pytest.param(
            RoutingControls(multiplier=MultiplyWeights(torch.ones(E, dtype=torch.int64))),
            TypeError, "multiplier must be a floating-point", id="factor-not-float",
        ),
        pytest.param(
            RoutingControls(drop=DropWeights(torch.zeros(E, dtype=torch.bool, device="meta"))),
            ValueError, "drop is on meta", id="wrong-device",
        ),
    ],
)
def test_validation_errors(controls: RoutingControls, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        route(torch.randn(3, E), RULE, controls=controls)


def test_a_token_mask_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match=r"token_mask must be a tensor of shape \(3,\)"):
        route(torch.randn(3, E), RULE, controls=RoutingControls(), token_mask=torch.ones(E, dtype=torch.bool))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: RoutingControls(rank=2, top_p=0.5), id="rank-with-top-p"),  # alternative selections
        pytest.param(lambda: RoutingControls(force=_bools(E, 1), select=RankSelect(1)), id="force-with-rank"),
        pytest.param(lambda: RankSelect(1, force=_bools(E, 1)), id="force-inside-rank"),
        pytest.param(lambda: TopPSelect(0.5, force=_bools(E, 1)), id="force-inside-top-p"),
        pytest.param(lambda: RoutingControls(drop_renormalize=True), id="renormalize-without-drop"),
    ],
)
def test_the_retired_flag_spellings_are_gone(build: Callable[[], object]) -> None:
    """A guard on the API's shape, not on behaviour: forcing lives inside top-k selection, top-p and
    rank are alternatives, and each renormalisation belongs to the part it undoes, so the flag
    spellings that could express contradictions must not come back."""
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        build()


@pytest.mark.parametrize(
    ("controls", "match"),
    [
        pytest.param(RoutingControls(drop=_bools(E, 1)), r"controls.drop must be DropWeights \| None, got Tensor", id="bare-drop"),
        pytest.param(RoutingControls(select=0.9), r"controls.select must be TopKSelect \| TopPSelect \| RankSelect", id="bare-top-p"),
        pytest.param(RoutingControls(multiplier=torch.ones(E)), "controls.multiplier must be MultiplyWeights", id="bare-multiplier"),
    ],
)
def test_controls_parts_must_be_their_variants(controls: RoutingControls, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        route(torch.randn(3, E), RULE, controls=controls)


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        pytest.param(RoutingRule(9, "softmax"), r"top_k=9 is outside \[1, 8\]", id="k-above-E"),
        pytest.param(
            RoutingRule(2, "softmax", n_group=3),
            "n_group=3 must be >= 1 and divide", id="groups-not-dividing",
        ),
        pytest.param(RoutingRule(4, "softmax", n_group=4, topk_group=1), "cannot fill top_k=4", id="groups-too-few"),
        pytest.param(
            RoutingRule(2, "softmax", select_before_score=True, n_group=2),
            "needs a score-first rule", id="groups-before-score",
        ),
    ],
)
def test_rule_validation_errors(rule: RoutingRule, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        route(torch.randn(3, E), rule)


def test_input_validation_errors() -> None:
    with pytest.raises(ValueError, match=r"logits must be a float \[T, E\] tensor"):
        route(torch.randn(2, 3, E), RULE)
    with pytest.raises(ValueError, match="impl='cuda' is not one of"):
        route(torch.randn(3, E), RULE, impl="cuda")  # type: ignore[arg-type]


def test_importing_the_package_does_not_import_triton() -> None:
    code = (
        "import sys, torch; from moelens.kernels.routing import route, RoutingRule;"
        "route(torch.randn(3, 8), RoutingRule(2, 'softmax'));"
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_triton_kernel_compiles_ahead_of_time_for_sm90() -> None:
    """The kernel builds for an H100 (sm_90) without a GPU, in every selection mode, including
    uncapped top-p over 256 experts (K_OUT = E: its slot loop must not be unrolled)."""
    from pathlib import Path

    # a subprocess: the suite runs triton under its interpreter (TRITON_INTERPRET=1), which compiles nothing
    done = subprocess.run(
        [sys.executable, "-m", "tests.aot_triton"], cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("compiled ")]
    assert len(lines) >= 4 and done.stdout.splitlines()[-1] == f"all {len(lines)} variants compiled", done.stdout
    assert all(line.endswith(".target sm_90a") for line in lines), lines
