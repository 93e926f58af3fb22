"""Fused masked-routing Triton kernel and its typed launcher; the contract is `routing.route`'s.

One program routes BLOCK_T tokens with all of a token's experts in registers ([BLOCK_T, BLOCK_E] tiles,
BLOCK_E the power of two >= E; sized for E <= 512 and K <= 16). Selection is k rounds of arg-max with the
lowest expert index winning ties. The only triton import of moelens lives here; on CPU tensors the kernel
runs under the interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .routing import RankSelect, RoutingControls, RoutingRule, TopPSelect, num_slots, top_p_cap

MODE_TOP_K: tl.constexpr = tl.constexpr(0)
MODE_TOP_P: tl.constexpr = tl.constexpr(1)
MODE_RANK: tl.constexpr = tl.constexpr(2)
MAX_UNROLLED_SLOTS = 16
TILE_ELEMENTS = 4096  # BLOCK_T * BLOCK_E: keeps a program's tiles within registers for E up to 512


@triton.jit
def _pick(key, candidates, cols, BLOCK_E: tl.constexpr):
    """[BT] column of the best candidate per row (lowest index on ties); BLOCK_E where there is none."""
    best = tl.max(tl.where(candidates, key, float("-inf")), axis=1)
    return tl.min(tl.where(candidates & (key == best[:, None]), cols[None, :], BLOCK_E), axis=1)


@triton.jit
def _routing_kernel(
    logits_ptr, stride_logits,  # [T, E], experts contiguous
    correction_bias_ptr, logit_bias_ptr, multiplier_ptr,  # [E] float32 or None
    disable_ptr, force_ptr, drop_ptr,  # [E] uint8 or None
    token_mask_ptr,  # [T] uint8 or None
    weights_ptr, indices_ptr,  # [T, K_OUT] float32 / int64, contiguous
    num_tokens, num_experts, top_k, num_forced, slots_on, rank, scaling, top_p,
    SOFTMAX: tl.constexpr, SQRT_SOFTPLUS: tl.constexpr, SELECT_BEFORE_SCORE: tl.constexpr,  # else sigmoid
    RENORMALIZE: tl.constexpr, RENORMALIZE_ON: tl.constexpr,  # for tokens without / with controls
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
    MODE: tl.constexpr, MULTIPLIER_RENORMALIZE: tl.constexpr, DROP_RENORMALIZE: tl.constexpr,
    K_OUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, SLOT_UNROLL: tl.constexpr,
):
    neg_inf = float("-inf")
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    ok = row_ok[:, None] & col_ok[None, :]
    nothing = (rows[:, None] < 0) & (cols[None, :] < 0)  # [BT, BE] all False
    x = tl.load(logits_ptr + rows[:, None] * stride_logits + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, neg_inf)  # [BT, BE]; padding experts are never eligible
    if token_mask_ptr is not None:
        on = tl.load(token_mask_ptr + rows, mask=row_ok, other=0) != 0  # [BT]: controls apply
    else:
        on = row_ok

    # 1. Intervene on the logits.
    if logit_bias_ptr is not None:
        bias = tl.load(logit_bias_ptr + cols, mask=col_ok, other=0.0)
        x = x + tl.where(on[:, None], bias[None, :], 0.0)
    if disable_ptr is not None:
        disabled = tl.load(disable_ptr + cols, mask=col_ok, other=0) != 0
        x = tl.where(on[:, None] & disabled[None, :], neg_inf, x)

    # 2. Scores (over all experts; select-before-score rules need them only for top-p) and choice scores.
    if SOFTMAX:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = e / tl.sum(e, axis=1)[:, None]
    else:
        scores = _per_expert_score(x, SQRT_SOFTPLUS)
    if SELECT_BEFORE_SCORE:  # the bias steers the choice; weights score the selected raw logits
        choice = x
        if correction_bias_ptr is not None:
            choice = choice + tl.load(correction_bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        choice = scores
        if correction_bias_ptr is not None:
            choice = choice + tl.load(correction_bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        choice = tl.where(x == neg_inf, neg_inf, choice)
    forced_key = choice

    # 3. Group-limited selection: keep the experts of the best TOPK_GROUP groups.
    if N_GROUP > 1:
        group_of = cols // GROUP_SIZE
        gcols = tl.arange(0, BLOCK_G)
        group_scores = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = (group_of == g)[None, :] & (choice > neg_inf)
            member = tl.where(in_group, choice, neg_inf)
            best = tl.max(member, axis=1)
            if GROUP_TOP2:
                first = _pick(member, in_group, cols, BLOCK_E)
                second = tl.max(tl.where(cols[None, :] == first[:, None], neg_inf, member), axis=1)
                best = best + tl.where(second == neg_inf, 0.0, second)
            group_scores = tl.where(gcols[None, :] == g, best[:, None], group_scores)
        group_open = (gcols[None, :] < N_GROUP) & (rows[:, None] >= 0)  # [BT, BG]
        kept = nothing
        for _ in tl.static_range(TOPK_GROUP):
            g_pick = _pick(group_scores, group_open, gcols, BLOCK_G)
            group_open = group_open & (gcols[None, :] != g_pick[:, None])
            kept = kept | (group_of[None, :] == g_pick[:, None])
        choice = tl.where(kept, choice, neg_inf)

    # 4. Select. Per token: n_slots slots, the first n_free from the unforced experts, the rest forced ones.
    if force_ptr is not None:
        forced = on[:, None] & (tl.load(force_ptr + cols, mask=col_ok, other=0) != 0)[None, :]
        n_free = top_k - tl.where(on, num_forced, 0)
    else:
        forced = nothing
        n_free = tl.full([BLOCK_T], 0, tl.int32) + top_k
    if MODE == MODE_TOP_K:
        n_slots = tl.full([BLOCK_T], 0, tl.int32) + top_k
    else:
        n_slots = tl.where(on, slots_on, top_k)
        n_free = n_slots
    eligible = choice > neg_inf
    taken = nothing
    if MODE == MODE_RANK:  # the rank-r expert (r counts from 0): first discard the r better ones
        for _ in range(rank):
            skip = _pick(choice, eligible & ~taken, cols, BLOCK_E)
            taken = taken | (on[:, None] & (cols[None, :] == skip[:, None]))
    if MODE == MODE_TOP_P:
        eligible_mass = tl.sum(tl.where(eligible, scores, 0.0), axis=1)
        mass_before = tl.zeros([BLOCK_T], tl.float32)
    picked_value = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)  # selected score, or logit before scoring
    picked = tl.full([BLOCK_T, BLOCK_K], BLOCK_E, tl.int32)
    # unrolled for the few slots of top-k; a loop when K_OUT reaches E (uncapped top-p: 256 unrolled rounds do not compile)
    for j in tl.range(K_OUT, loop_unroll_factor=SLOT_UNROLL):
        free_slot = (j < n_free)[:, None]
        candidates = tl.where(free_slot, eligible & ~forced, forced) & ~taken
        pick = _pick(tl.where(free_slot, choice, forced_key), candidates, cols, BLOCK_E)
        hit = cols[None, :] == pick[:, None]  # [BT, BE] one-hot (all False for no pick)
        taken = taken | hit
        valid = (pick < BLOCK_E) & (j < n_slots)
        if MODE == MODE_TOP_P:
            valid = valid & (~on | (mass_before <= top_p) | (top_p >= 1.0))  # p = 1: every slot, whatever the rounding
            mass_before += tl.sum(tl.where(hit, scores, 0.0), axis=1) / eligible_mass
        if SELECT_BEFORE_SCORE:
            value = tl.sum(tl.where(hit, x, 0.0), axis=1)
        else:
            value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        slot = (kcols == j)[None, :]
        picked_value = tl.where(slot, value[:, None], picked_value)
        picked = tl.where(slot & valid[:, None], pick[:, None], picked)
    filled = picked < BLOCK_E  # [BT, BK]

    # 5. Weights: score, renormalise, scale.
    if SELECT_BEFORE_SCORE:
        if SOFTMAX:
            v = tl.where(filled, picked_value, neg_inf)
            e = tl.where(filled, tl.exp(v - tl.max(v, axis=1)[:, None]), 0.0)
            weights = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
        else:
            weights = tl.where(filled, _per_expert_score(picked_value, SQRT_SOFTPLUS), 0.0)
    else:
        weights = tl.where(filled, picked_value, 0.0)
    if MODE == MODE_TOP_P:
        if not SOFTMAX:  # a per-expert score under top-p: its share of the eligible score mass
            weights = tl.where(on[:, None], weights / eligible_mass[:, None], weights)
    if RENORMALIZE or RENORMALIZE_ON:
        renormalized = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
        if RENORMALIZE and RENORMALIZE_ON:
            weights = renormalized
        elif RENORMALIZE_ON:
            weights = tl.where(on[:, None], renormalized, weights)
        else:
            weights = tl.where(on[:, None], weights, renormalized)
    weights = weights * scaling
    if MODE == MODE_RANK:
        weights = tl.where(on[:, None], filled.to(tl.float32) * scaling, weights)

    # 6. Intervene on the weights (tokens without controls get factor 1 and no drop).
    gathered = on[:, None] & filled
    if multiplier_ptr is not None:
        total = tl.sum(weights, axis=1)
        weights = weights * tl.load(multiplier_ptr + picked, mask=gathered, other=1.0)
        if MULTIPLIER_RENORMALIZE:
            weights = weights * _restore(total, tl.sum(weights, axis=1), on)[:, None]
    if drop_ptr is not None:
        total = tl.sum(weights, axis=1)
        weights = tl.where(tl.load(drop_ptr + picked, mask=gathered, other=0) != 0, 0.0, weights)
        if DROP_RENORMALIZE:
            weights = weights * _restore(total, tl.sum(weights, axis=1), on)[:, None]

    out = rows[:, None] * K_OUT + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols < K_OUT)[None, :]
    tl.store(weights_ptr + out, weights, mask=out_ok)
    tl.store(indices_ptr + out, tl.where(filled, picked, num_experts).to(tl.int64), mask=out_ok)


@triton.jit
def _per_expert_score(x, SQRT_SOFTPLUS: tl.constexpr):
    """sigmoid(x), or sqrt(softplus(x)) with softplus = log1p(e^x) as torch computes it (x past 20
    taken as is); -inf gives 0. log1p(u) = log(w) * u / (w - 1) with w = 1 + u rounded (Goldberg):
    accurate where log(1 + u) would lose the small u to rounding."""
    if SQRT_SOFTPLUS:
        u = tl.exp(tl.minimum(x, 20.0))
        w = 1.0 + u
        log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
        return tl.sqrt(tl.where(x > 20.0, x, log1p))
    else:
        return tl.sigmoid(x)


@triton.jit
def _restore(total, now, on):
    """Factor bringing a row's weight sum from `now` back to `total`: 1 without controls, 0 if all are 0."""
    return tl.where(on, tl.where(now > 0, total / tl.where(now > 0, now, 1.0), 0.0), 1.0)


def route_triton(
    logits: Tensor,
    rule: RoutingRule,
    *,
    correction_bias: Tensor | None = None,
    controls: RoutingControls | None = None,
    token_mask: Tensor | None = None,
    block_t: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the kernel: logits [T, E] -> (weights [T, K] float32, indices [T, K] int64), see `routing.route`.

    block_t: tokens per program (a power of two); default TILE_ELEMENTS // BLOCK_E, at most the token count.
    Inputs are assumed validated (`routing.validate`). CPU tensors need TRITON_INTERPRET=1.
    """
    c = controls or RoutingControls()
    num_tokens, num_experts = logits.shape
    k_out = num_slots(rule, c, num_experts, masked=token_mask is not None)
    if not logits.is_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton routing kernel got CPU tensors without the interpreter; set TRITON_INTERPRET=1 "
            "before triton is imported, or use impl='torch'"
        )
    weights = torch.empty(num_tokens, k_out, dtype=torch.float32, device=logits.device)
    indices = torch.empty(num_tokens, k_out, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, indices
    arguments, constants = kernel_arguments(
        logits, rule, correction_bias=correction_bias, controls=c, token_mask=token_mask, out=(weights, indices), block_t=block_t
    )
    _routing_kernel[(triton.cdiv(num_tokens, constants["BLOCK_T"]),)](*arguments, **constants)
    return weights, indices


def kernel_arguments(
    logits: Tensor,
    rule: RoutingRule,
    *,
    correction_bias: Tensor | None,
    controls: RoutingControls,
    token_mask: Tensor | None,
    out: tuple[Tensor, Tensor],
    block_t: int | None = None,
) -> tuple[tuple[object, ...], dict[str, object]]:
    """The kernel's runtime arguments (in order; ``None`` for an absent vector) and its constexprs
    for one call: what :func:`route_triton` launches, and what the ahead-of-time build test
    (``tests/aot_triton.py``) compiles. ``out``: the (weights, indices) [T, K] outputs."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights, indices = out
    k_out = weights.shape[1]
    block_e = triton.next_power_of_2(num_experts)
    select, multiplier, drop = controls.select, controls.multiplier, controls.drop
    rank, top_p, renormalize_on = 0, 1.0, rule.renormalize
    if isinstance(select, RankSelect):
        mode, slots_on, rank = MODE_RANK.value, 1, select.rank
    elif isinstance(select, TopPSelect):
        mode, slots_on = MODE_TOP_P.value, top_p_cap(select, num_experts)
        top_p, renormalize_on = select.p, select.renormalize
    else:
        mode, slots_on = MODE_TOP_K.value, rule.top_k
    arguments = (
        logits, logits.stride(0),
        _floats(correction_bias), _floats(controls.logit_bias), _floats(multiplier.factors if multiplier else None),
        _bytes(controls.disable), _bytes(controls.force), _bytes(drop.experts if drop else None),
        _bytes(token_mask),
        weights, indices,
        num_tokens, num_experts, rule.top_k, int(controls.force.sum()) if controls.force is not None else 0,
        slots_on, rank, float(rule.scaling), float(top_p),
    )
    constants = dict(
        SOFTMAX=rule.score == "softmax", SQRT_SOFTPLUS=rule.score == "sqrtsoftplus", SELECT_BEFORE_SCORE=rule.select_before_score,
        RENORMALIZE=rule.renormalize,
        RENORMALIZE_ON=renormalize_on,
        N_GROUP=rule.n_group, GROUP_SIZE=num_experts // rule.n_group, TOPK_GROUP=rule.topk_group,
        GROUP_TOP2=rule.group_score == "top2_sum",
        MODE=mode, MULTIPLIER_RENORMALIZE=bool(multiplier and multiplier.renormalize),
        DROP_RENORMALIZE=bool(drop and drop.renormalize),
        K_OUT=k_out, BLOCK_T=block_t or max(1, min(triton.next_power_of_2(num_tokens), TILE_ELEMENTS // block_e)),
        BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(k_out),
        BLOCK_G=triton.next_power_of_2(rule.n_group), SLOT_UNROLL=slot_unroll(k_out),
    )
    return arguments, constants


def slot_unroll(k_out: int) -> int:
    """How far the kernel unrolls its slot loop: fully for up to MAX_UNROLLED_SLOTS slots, not at all beyond."""
    return k_out if k_out <= MAX_UNROLLED_SLOTS else 1


def _floats(v: Tensor | None) -> Tensor | None:
    return None if v is None else v.float().contiguous()


def _bytes(v: Tensor | None) -> Tensor | None:
    return None if v is None else v.contiguous().view(torch.uint8)
