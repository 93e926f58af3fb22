"""Compile the Triton routing kernel ahead of time for an sm_90 GPU (no GPU needed), one variant
per selection mode and pointer layout. Run as ``python -m tests.aot_triton``: the test suite sets
TRITON_INTERPRET=1, under which kernels are interpreted, not compiled, so this runs apart.

Prints ``compiled <variant>: <ptx .target line>`` per variant, then ``all N variants compiled``;
exits non-zero on the first failure.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moelens.kernels.triton_routing import MODE_RANK, MODE_TOP_K, MODE_TOP_P, _routing_kernel, slot_unroll  # noqa: E402

POINTERS = {
    "logits_ptr": "*bf16", "weights_ptr": "*fp32", "indices_ptr": "*i64",
    "correction_bias_ptr": "*fp32", "logit_bias_ptr": "*fp32", "multiplier_ptr": "*fp32",
    "disable_ptr": "*u8", "force_ptr": "*u8", "drop_ptr": "*u8", "token_mask_ptr": "*u8",
}
FLOATS = {"scaling", "top_p"}
BASE = dict(
    SOFTMAX=True, SQRT_SOFTPLUS=False, SELECT_BEFORE_SCORE=False, RENORMALIZE=True, RENORMALIZE_ON=True, N_GROUP=1, GROUP_SIZE=64,
    TOPK_GROUP=1, GROUP_TOP2=False, MODE=MODE_TOP_K.value, MULTIPLIER_RENORMALIZE=False, DROP_RENORMALIZE=False,
    K_OUT=8, BLOCK_T=64, BLOCK_E=64, BLOCK_K=8, BLOCK_G=1,
)
# (name, constexpr overrides, pointers passed as None)
VARIANTS = [
    ("top-k, every control, token mask", {}, ()),
    ("top-k, no controls", {}, ("correction_bias_ptr", "logit_bias_ptr", "multiplier_ptr", "disable_ptr", "force_ptr", "drop_ptr", "token_mask_ptr")),
    ("top-p over DeepSeek-V3 groups", dict(MODE=MODE_TOP_P.value, N_GROUP=8, GROUP_SIZE=32, TOPK_GROUP=4, GROUP_TOP2=True,
                                           SOFTMAX=False, K_OUT=256, BLOCK_E=256, BLOCK_K=256, BLOCK_G=8, BLOCK_T=16), ("force_ptr",)),
    ("rank, select before score", dict(MODE=MODE_RANK.value, SELECT_BEFORE_SCORE=True, K_OUT=1, BLOCK_K=1), ("token_mask_ptr",)),
    ("DeepSeek-V4: sqrt(softplus), correction bias", dict(SOFTMAX=False, SQRT_SOFTPLUS=True), ("token_mask_ptr", "force_ptr")),
]


def compile_variant(overrides: dict[str, object], absent: tuple[str, ...]) -> str:
    """The PTX ``.target`` line of the kernel compiled for sm_90 with these constexprs."""
    names = _routing_kernel.arg_names
    constants = {**BASE, **overrides, **{name: None for name in absent}}
    constants["SLOT_UNROLL"] = slot_unroll(int(constants["K_OUT"]))
    signature = {
        name: "constexpr" if name in constants else POINTERS.get(name) or ("fp32" if name in FLOATS else "i32")
        for name in names
    }
    source = ASTSource(fn=_routing_kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    return next(line for line in compiled.asm["ptx"].splitlines() if line.startswith(".target"))


if __name__ == "__main__":
    for name, overrides, absent in VARIANTS:
        print(f"compiled {name}: {compile_variant(overrides, absent)}", flush=True)
    print(f"all {len(VARIANTS)} variants compiled")
