"""Compile the Triton routing kernel ahead of time for an sm_90 GPU (no GPU needed), for the
arguments the launcher would pass in five routing configurations. Run as
``python -m tests.aot_triton``: the test suite sets TRITON_INTERPRET=1, under which kernels are
interpreted, not compiled, so this runs apart.

Each configuration is a real ``route()`` call's rule and controls; the kernel's arguments and
constexprs come from the launcher itself (:func:`moelens.kernels.triton_routing.kernel_arguments`),
so what is compiled is what a GPU run would launch.

Prints ``compiled <variant>: <ptx .target line>`` per variant, then ``all N variants compiled``;
exits non-zero on the first failure.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moelens.kernels.routing import (  # noqa: E402
    DropWeights,
    MultiplyWeights,
    RankSelect,
    RoutingControls,
    RoutingRule,
    TopKSelect,
    TopPSelect,
    num_slots,
)
from moelens.kernels.triton_routing import _routing_kernel, kernel_arguments  # noqa: E402

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8", torch.int64: "*i64"}
TOKENS = 300


def _experts(num_experts: int, *chosen: int) -> torch.Tensor:
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[list(chosen)] = True
    return mask


def _variants() -> list[tuple[str, int, RoutingRule, RoutingControls, bool, bool]]:
    """(name, E, rule, controls, with a correction bias, with a token mask)."""
    softmax_8 = RoutingRule(8, "softmax", renormalize=True)
    every_control = RoutingControls(
        logit_bias=torch.randn(64),
        disable=_experts(64, 1, 2),
        select=TopKSelect(force=_experts(64, 3)),
        multiplier=MultiplyWeights(torch.full((64,), 2.0), renormalize=True),
        drop=DropWeights(_experts(64, 4), renormalize=True),
    )
    deepseek_v3 = RoutingRule(8, "sigmoid", renormalize=True, scaling=2.5, n_group=8, topk_group=4, group_score="top2_sum")
    return [
        ("top-k, every control, token mask", 64, softmax_8, every_control, False, True),
        ("top-k, no controls", 64, softmax_8, RoutingControls(), False, False),
        ("uncapped top-p over DeepSeek-V3 groups (K = 256)", 256, deepseek_v3, RoutingControls(select=TopPSelect(0.5)), True, False),
        ("rank, select before score", 32, RoutingRule(4, "softmax", select_before_score=True), RoutingControls(select=RankSelect(1)), False, False),
        ("DeepSeek-V4: sqrt(softplus), correction bias", 64, RoutingRule(6, "sqrtsoftplus", renormalize=True, scaling=1.5),
         RoutingControls(disable=_experts(64, 0)), True, False),
    ]


def compile_variant(num_experts: int, rule: RoutingRule, controls: RoutingControls, biased: bool, masked: bool) -> str:
    """The PTX ``.target`` line of the kernel compiled for sm_90 with the launcher's arguments for
    this configuration (bf16 logits, ``TOKENS`` tokens)."""
    k_out = num_slots(rule, controls, num_experts, masked=masked)
    out = (torch.empty(TOKENS, k_out), torch.empty(TOKENS, k_out, dtype=torch.int64))
    arguments, constants = kernel_arguments(
        torch.randn(TOKENS, num_experts).bfloat16(), rule,
        correction_bias=torch.randn(num_experts) if biased else None, controls=controls,
        token_mask=torch.rand(TOKENS) < 0.5 if masked else None, out=out,
    )
    names = _routing_kernel.arg_names
    runtime = [name for name in names if name not in constants]
    signature: dict[str, str] = {name: "constexpr" for name in constants}
    for name, value in zip(runtime, arguments, strict=True):
        if value is None:
            signature[name], constants[name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    source = ASTSource(
        fn=_routing_kernel,
        signature={name: signature[name] for name in names},
        constexprs={(names.index(name),): value for name, value in constants.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    return next(line for line in compiled.asm["ptx"].splitlines() if line.startswith(".target"))


if __name__ == "__main__":
    variants = _variants()
    for name, *configuration in variants:
        print(f"compiled {name}: {compile_variant(*configuration)}", flush=True)
    print(f"all {len(variants)} variants compiled")
