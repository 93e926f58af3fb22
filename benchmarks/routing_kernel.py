"""CPU routing cost: moelens' routing path vs the naive composition vs the family's own router, side by side.

    python benchmarks/routing_kernel.py [--threads N]   (default 1)

For E in {8, 64, 256} and T in {1, 64, 1024, 8192}, on the same logits in one run:
- router: the family's transformers router module forward, given the logits (its linear layer is made an
  identity for the measurement, so only the routing is timed);
- naive:  the intervention-ready composition of separate torch ops (mask, softmax, topk, gather, renormalise);
- route:  `moelens.kernels.routing.route` (public API, validation included) with no controls, and with a disable
  mask (an active intervention).
Reported: microseconds per call (best of 7 repeats) and the ratios naive/route and router/route (> 1: route
is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from collections.abc import Callable, Iterator

import torch
import transformers
from torch import Tensor

from moelens.kernels.routing import RoutingControls, RoutingRule, route

FAMILIES = {  # name: (transformers module, config class, router class, experts key, top_k)
    "mixtral": ("mixtral", "MixtralConfig", "MixtralTopKRouter", "num_local_experts", 2),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3TopkRouter", "n_routed_experts", 8),
}


class _IdentityLinear:
    """Stands in for torch.nn.functional inside a modeling module: linear passes the logits through."""

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return x if bias is None else x + bias


@contextlib.contextmanager
def _logits_given(modeling) -> Iterator[None]:
    functional = modeling.F
    modeling.F = _IdentityLinear()
    try:
        yield
    finally:
        modeling.F = functional


def _router(family: str, num_experts: int) -> tuple[torch.nn.Module, object, RoutingRule, Tensor | None]:
    module, config_cls, router_cls, experts_key, top_k = FAMILIES[family]
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    config = getattr(transformers, config_cls)(
        hidden_size=num_experts, num_attention_heads=1, num_key_value_heads=1, num_experts_per_tok=top_k,
        **{experts_key: num_experts},
    )
    router = getattr(modeling, router_cls)(config).eval()
    if family == "mixtral":
        return router, modeling, RoutingRule(top_k, "softmax", renormalize=True), None
    router.e_score_correction_bias.normal_(0, 0.1)
    rule = RoutingRule(
        top_k, "sigmoid", renormalize=True, scaling=config.routed_scaling_factor, n_group=config.n_group,
        topk_group=config.topk_group, group_score="top2_sum",
    )
    return router, modeling, rule, router.e_score_correction_bias


def _naive(logits: Tensor, rule: RoutingRule, disabled: Tensor, correction_bias: Tensor | None) -> Tensor:
    """Separate ops, each materialising its [T, E] result, as an intervention-ready router would be written."""
    x = logits.masked_fill(disabled, float("-inf"))
    scores = torch.softmax(x.float(), dim=-1) if rule.score == "softmax" else torch.sigmoid(x.float())
    choice = scores if correction_bias is None else (scores + correction_bias).masked_fill(disabled, float("-inf"))
    if rule.n_group > 1:
        grouped = choice.view(len(x), rule.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(rule.topk_group, dim=-1).indices, 1)
        choice = choice.masked_fill(~group_mask.bool().repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    indices = torch.topk(choice, rule.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * rule.scaling


def _best_us(fn: Callable[[], object], budget_s: float = 0.07, repeats: int = 7) -> float:
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s / repeats or calls < 1:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    """Print router vs naive vs route (and route with a disable mask) times per family, E and T."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One intra-op thread by default: on a shared machine, multi-threaded timings of these small ops are noise.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); times in us per call (best of 7)\n")
    header = f"{'family':<12}{'E':>5}{'T':>6}{'router':>10}{'naive':>10}{'route':>10}{'+disable':>10}" \
             f"{'naive/route':>13}{'router/route':>14}"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for family in FAMILIES:
        for num_experts in (8, 64, 256):
            if family == "deepseek_v3" and num_experts < 64:
                continue  # 8 groups of >= 2 experts and 8 slots need E >= 64 here
            router, modeling, rule, correction_bias = _router(family, num_experts)
            disabled = torch.zeros(num_experts, dtype=torch.bool)
            controls = RoutingControls(disable=disabled.clone().index_fill_(0, torch.tensor([0]), True))
            for num_tokens in (1, 64, 1024, 8192):
                logits = torch.randn(num_tokens, num_experts, generator=gen)
                with torch.no_grad(), _logits_given(modeling):
                    times = {
                        "router": _best_us(lambda: router(logits)),
                        "naive": _best_us(lambda: _naive(logits, rule, disabled, correction_bias)),
                        "route": _best_us(lambda: route(logits, rule, correction_bias=correction_bias)),
                        "+disable": _best_us(
                            lambda: route(logits, rule, correction_bias=correction_bias, controls=controls)
                        ),
                    }
                print(
                    f"{family:<12}{num_experts:>5}{num_tokens:>6}"
                    + "".join(f"{times[k]:>10.1f}" for k in ("router", "naive", "route", "+disable"))
                    + f"{times['naive'] / times['route']:>12.2f}x{times['router'] / times['route']:>13.2f}x"
                )


if __name__ == "__main__":
    main()
