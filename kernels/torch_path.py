"""The fast CPU routing path: the contract of `routing.route` in as few passes over [T, E] as torch allows.

Where it saves work over the reference (and over the families' own routers):
- For rules without correction bias or groups, the score function is monotone (softmax, sigmoid, sqrt(softplus)), so
  top-k runs on the logits and the [T, E] score tensor is never written: renormalised softmax weights are a
  softmax over the k selected logits, raw ones exp(logit - logsumexp). (Ties created by rounding the
  probabilities are the only case where this could order experts differently; torch.topk leaves their order
  unspecified anyway.)
- The controls' vectors are turned once per RoutingControls object (frozen: treat its tensors as immutable)
  into what the passes consume: logit bias and disable mask folded into one additive [E] vector, forced
  expert ids, multiplier and drop as [E + 1] factor vectors (the extra entry serves the sentinel slot) taken
  at the selected indices. At decode time (T = 1) per-op overhead dominates, so every op saved counts.
- A token_mask routes the two token subsets separately, so no token is routed twice.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import RankSelect, RoutingControls, RoutingRule, TopPSelect, num_slots, score_of, top_p_cap

NEG_INF = float("-inf")
_NO_CONTROLS = RoutingControls()


@dataclass(frozen=True)
class _Prepared:
    """A RoutingControls' vectors in the form the passes consume."""

    shift: Tensor | None = None  # [E] float: logit bias, -inf for disabled experts
    disabled_inf: Tensor | None = None  # [E] float: 0, -inf for disabled experts (added to choice scores)
    n_disabled: int = 0
    force_ids: Tensor | None = None  # [F] int64
    forced_inf: Tensor | None = None  # [E] float: 0, -inf for forced experts (they leave the free choice)
    multiplier: Tensor | None = None  # [E + 1] float
    multiplier_restores: bool = False  # rescale to the pre-multiplication total
    keep: Tensor | None = None  # [E + 1] float: 0 for dropped experts, else 1
    keep_restores: bool = False  # rescale to the pre-drop total


_PLAIN = _Prepared()
_prepared: weakref.WeakKeyDictionary[RoutingControls, _Prepared] = weakref.WeakKeyDictionary()


def _prepare(c: RoutingControls) -> _Prepared:
    if c is _NO_CONTROLS:
        return _PLAIN
    if (prep := _prepared.get(c)) is not None:
        return prep
    disabled_inf = _neg_inf_where(c.disable)
    shift = c.logit_bias.float() if c.logit_bias is not None else None
    if disabled_inf is not None:
        shift = disabled_inf if shift is None else shift + disabled_inf
    prep = _Prepared(
        shift=shift,
        disabled_inf=disabled_inf,
        n_disabled=int(c.disable.sum()) if c.disable is not None else 0,
        force_ids=c.force.nonzero().flatten() if c.force is not None else None,
        forced_inf=_neg_inf_where(c.force),
        multiplier=_with_sentinel(c.multiplier.factors.float()) if c.multiplier is not None else None,
        multiplier_restores=c.multiplier is not None and c.multiplier.renormalize,
        keep=_with_sentinel((~c.drop.experts).float()) if c.drop is not None else None,
        keep_restores=c.drop is not None and c.drop.renormalize,
    )
    _prepared[c] = prep
    return prep


def route_torch(
    logits: Tensor,
    rule: RoutingRule,
    *,
    correction_bias: Tensor | None = None,
    controls: RoutingControls | None = None,
    token_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, K] float32, indices [T, K] int64), see `routing.route`."""
    c = controls or _NO_CONTROLS
    prep = _prepare(c)
    if token_mask is None:
        return _route(logits, rule, correction_bias, c, prep)
    num_tokens, num_experts = logits.shape
    k = num_slots(rule, c, num_experts, masked=True)
    weights = logits.new_zeros(num_tokens, k, dtype=torch.float32)
    indices = torch.full((num_tokens, k), num_experts, dtype=torch.int64, device=logits.device)
    for rows, part_controls, part_prep in (
        (token_mask.nonzero().flatten(), c, prep),
        ((~token_mask).nonzero().flatten(), _NO_CONTROLS, _PLAIN),
    ):
        w, i = _route(logits[rows], rule, correction_bias, part_controls, part_prep)
        weights[rows, : w.shape[1]] = w
        indices[rows, : i.shape[1]] = i
    return weights, indices


def _route(
    logits: Tensor, rule: RoutingRule, correction_bias: Tensor | None, c: RoutingControls, prep: _Prepared
) -> tuple[Tensor, Tensor]:
    """Route all tokens with controls `c` prepared as `prep`."""
    num_experts = logits.shape[1]
    x = logits.float() if prep.shift is None else logits.float() + prep.shift  # [T, E]: bias and disable, one pass

    monotone = rule.select_before_score or (rule.n_group == 1 and correction_bias is None)
    if monotone:  # choice in the same order as the scores; disabled experts are already -inf
        scores = None
        # select-before-score rules with a bias (Kolibri): the bias steers the choice, not the weights
        choice = x if correction_bias is None else x + correction_bias.float()
    else:
        scores = score_of(x, rule.score)
        choice_shift = correction_bias.float() if correction_bias is not None else None
        if prep.disabled_inf is not None:  # sigmoid(-inf) + bias would still be finite
            choice_shift = prep.disabled_inf if choice_shift is None else choice_shift + prep.disabled_inf
        choice = scores if choice_shift is None else scores + choice_shift
    forced_key = choice
    if rule.n_group > 1:
        choice = _limit_to_best_groups(choice, rule, has_ineligible=prep.n_disabled > 0)

    # Selection: [T, n_pick] in descending choice order. Without selection controls no slot can be empty.
    force_ids = prep.force_ids
    n_forced = len(force_ids) if force_ids is not None else 0
    rank = c.select.rank if isinstance(c.select, RankSelect) else None
    top_p = c.select if isinstance(c.select, TopPSelect) else None
    if rank is not None:
        n_pick = rank + 1  # the rank-r expert is the (r + 1)-th choice: rank counts from 0
    elif top_p is not None:
        n_pick = top_p_cap(top_p, num_experts)
    else:
        n_pick = rule.top_k - n_forced
    values, indices = _topk(choice if force_ids is None else choice + prep.forced_inf, n_pick)
    if rule.n_group > 1:
        surely_eligible = 0 if prep.n_disabled else rule.topk_group * (num_experts // rule.n_group) - n_forced
    else:
        surely_eligible = num_experts - prep.n_disabled - n_forced
    may_be_empty = n_pick > surely_eligible
    if may_be_empty:
        indices.masked_fill_(values == NEG_INF, num_experts)
    if rank is not None:
        indices = indices[:, rank:]  # [T, 1]
        return _reweigh((indices != num_experts).float() * rule.scaling, indices, prep), indices

    # [T, K] selected logits, -inf in empty slots (with a choice bias: the raw logits, gathered)
    picked = (values if correction_bias is None else _gathered(x, indices)) if monotone else None
    eligible_mass = None
    if top_p is not None:
        cut, eligible_mass = _beyond_top_p(x, scores, choice, indices, rule, top_p.p)
        indices.masked_fill_(cut, num_experts)
        picked = picked.masked_fill(cut, NEG_INF) if monotone else None
    elif force_ids is not None and len(force_ids):
        if n_forced == 1:
            forced = force_ids.expand(len(indices), 1)  # [T, F]
        else:  # forced experts among themselves in descending choice order
            order = forced_key.index_select(1, force_ids).argsort(dim=-1, descending=True, stable=True)
            forced = force_ids[order]
        indices = torch.cat([indices, forced], dim=-1)  # forced experts take the last slots
        picked = torch.cat([picked, x.gather(1, forced)], dim=-1) if monotone else None
    renormalize = top_p.renormalize if top_p is not None else rule.renormalize
    if picked is None:
        if may_be_empty or top_p is not None:
            weights = scores.gather(1, indices.clamp(max=num_experts - 1)).masked_fill_(indices == num_experts, 0.0)
        else:
            weights = scores.gather(1, indices)
    elif rule.score != "softmax":
        weights = score_of(picked, rule.score)
    elif rule.select_before_score or renormalize:
        weights = _softmax_over_slots(picked)  # GPT-OSS's weights, or the renormalised top-k probabilities
        renormalize = False
    else:
        weights = torch.exp(picked - torch.logsumexp(x, dim=-1, keepdim=True))
    if eligible_mass is not None and rule.score != "softmax":
        weights = weights / eligible_mass  # a per-expert score under top-p: its share of the eligible mass
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    if rule.scaling != 1.0:
        weights *= rule.scaling
    return _reweigh(weights, indices, prep), indices


def _topk(t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sorted top-k along the last dim, as torch.topk, whose CPU kernel is slow for tiny k: k = 1 is an arg-max,
    k = 2 two arg-max passes where measured faster (<= 64 experts, enough work to amortise the extra ops)."""
    if k == 1:
        return t.max(dim=-1, keepdim=True)
    if k != 2 or t.shape[1] > 64 or t.numel() < 32768:
        return t.topk(k, dim=-1)
    values, indices = t.max(dim=-1, keepdim=True)  # [T, 1]
    second, second_index = t.scatter(-1, indices, NEG_INF).max(dim=-1, keepdim=True)
    return torch.cat([values, second], dim=-1), torch.cat([indices, second_index], dim=-1)


def _softmax_over_slots(t: Tensor) -> Tensor:
    """Softmax over the [T, K] slots; torch's CPU softmax is 2-4x slower than the explicit form for K <= 4 on many
    rows (measured), while the explicit form costs more ops at small T."""
    if t.shape[1] > 4 or len(t) < 256:
        return torch.softmax(t, dim=-1)
    e = (t - t.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def _limit_to_best_groups(choice: Tensor, rule: RoutingRule, *, has_ineligible: bool) -> Tensor:
    """-inf outside each token's best `topk_group` groups; masks a [T, G, E/G] view instead of scattering."""
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, rule.n_group, num_experts // rule.n_group)  # [T, G, E/G]
    if rule.group_score == "max":
        group_scores = grouped.amax(dim=-1)
    else:
        first, where_first = grouped.max(dim=-1, keepdim=True)  # arg-max passes: several times faster than topk
        second = grouped.scatter(-1, where_first, NEG_INF).amax(dim=-1)
        if has_ineligible:  # a group with one eligible expert scores that expert alone
            second.masked_fill_(second == NEG_INF, 0.0)
        group_scores = first.squeeze(-1) + second
    kept = group_scores.new_zeros(group_scores.shape, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(rule.topk_group, dim=-1, sorted=False).indices, True)  # [T, G]
    return grouped.masked_fill(~kept[..., None], NEG_INF).view_as(choice)


def _gathered(x: Tensor, indices: Tensor) -> Tensor:
    """[T, K] x at ``indices``, -inf in empty slots (index E)."""
    num_experts = x.shape[1]
    return x.gather(1, indices.clamp(max=num_experts - 1)).masked_fill_(indices == num_experts, NEG_INF)


def _beyond_top_p(
    x: Tensor, scores: Tensor | None, choice: Tensor, indices: Tensor, rule: RoutingRule, p: float
) -> tuple[Tensor, Tensor]:
    """([T, K] True for the slots after the first whose cumulative normalised score (over eligible experts)
    exceeds p, [T, 1] the eligible experts' score mass)."""
    num_experts = x.shape[1]
    if scores is None:
        scores = score_of(x, rule.score)
    eligible_mass = scores.masked_fill(choice == NEG_INF, 0.0).sum(dim=-1, keepdim=True)
    picked = scores.gather(1, indices.clamp(max=num_experts - 1)).masked_fill_(indices == num_experts, 0.0)
    mass = (picked / eligible_mass).cumsum(dim=-1)
    mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
    return (mass_before > p) & (p < 1.0), eligible_mass  # p = 1 keeps every slot, whatever the rounding


def _reweigh(weights: Tensor, indices: Tensor, prep: _Prepared) -> Tensor:
    """Apply multiplier, then drop, each optionally restoring the per-token total."""
    for factors, restore_total in ((prep.multiplier, prep.multiplier_restores), (prep.keep, prep.keep_restores)):
        if factors is None:
            continue
        total = weights.sum(dim=-1, keepdim=True) if restore_total else None
        weights = weights * factors.take(indices)
        if restore_total:
            now = weights.sum(dim=-1, keepdim=True)
            weights *= torch.where(now > 0, total / now, 0.0)  # 0 / 0 where every weight is already 0
    return weights


def _neg_inf_where(mask: Tensor | None) -> Tensor | None:
    """[E] float: -inf where mask, else 0; added to logits or scores it excludes experts in one pass."""
    return None if mask is None else torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, NEG_INF)


def _with_sentinel(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(1)])  # [E + 1]; the sentinel slot's weight is 0 whatever its factor
