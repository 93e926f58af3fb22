"""Pure-torch reference of the routing contract in `routing.py`: op by op, mirroring the families' routers.

Written for clarity, not speed; the ground truth the torch path and the Triton kernel are tested against.
Inputs are assumed validated (`routing.validate`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routing import RankSelect, RoutingControls, RoutingRule, TopPSelect, num_slots, score_of, top_p_cap

NEG_INF = float("-inf")


def route_reference(
    logits: Tensor,
    rule: RoutingRule,
    *,
    correction_bias: Tensor | None = None,
    controls: RoutingControls | None = None,
    token_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, K] float32, indices [T, K] int64), see `routing.route`."""
    controls = controls or RoutingControls()
    if token_mask is None:
        return _route_all_tokens(logits, rule, correction_bias, controls)
    # Route every token both ways and keep, per token, the one its mask asks for.
    k = num_slots(rule, controls, logits.shape[1], masked=True)
    w_on, i_on = _route_all_tokens(logits, rule, correction_bias, controls)
    w_off, i_off = _route_all_tokens(logits, rule, correction_bias, RoutingControls())
    num_experts = logits.shape[1]
    mask = token_mask[:, None]
    weights = torch.where(mask, _pad(w_on, k, 0.0), _pad(w_off, k, 0.0))
    indices = torch.where(mask, _pad(i_on, k, num_experts), _pad(i_off, k, num_experts))
    return weights, indices


def _route_all_tokens(
    logits: Tensor, rule: RoutingRule, correction_bias: Tensor | None, c: RoutingControls
) -> tuple[Tensor, Tensor]:
    num_tokens, num_experts = logits.shape

    # 1. Intervene on the logits.
    x = logits.float()
    if c.logit_bias is not None:
        x = x + c.logit_bias.float()
    disabled = c.disable if c.disable is not None else torch.zeros(num_experts, dtype=torch.bool, device=x.device)
    x = x.masked_fill(disabled, NEG_INF)

    # 2. Scores and choice scores.
    full_scores = score_of(x, rule.score)
    if rule.select_before_score:  # the bias steers the choice; weights score the selected raw logits
        choice = x if correction_bias is None else x + correction_bias.float()
    else:
        choice = full_scores if correction_bias is None else full_scores + correction_bias.float()
        choice = choice.masked_fill(disabled, NEG_INF)  # sigmoid(-inf) + bias would still be finite
    forced_order_key = choice

    # 3. Group-limited selection (DeepSeek): only experts of the best topk_group groups stay eligible.
    if rule.n_group > 1:
        choice = _limit_to_best_groups(choice, rule)

    # 4. Select slots in descending choice order; -inf means "no eligible expert left": an empty slot.
    force = c.force if c.force is not None else torch.zeros(num_experts, dtype=torch.bool, device=x.device)
    forced_ids = force.nonzero().flatten()
    select = c.select
    rank = select.rank if isinstance(select, RankSelect) else None
    top_p = select if isinstance(select, TopPSelect) else None
    if rank is not None:
        n_pick = rank + 1  # the rank-r expert is the (r + 1)-th choice: rank counts from 0
    elif top_p is not None:
        n_pick = top_p_cap(top_p, num_experts)
    else:
        n_pick = rule.top_k - len(forced_ids)
    top_values, indices = torch.topk(choice.masked_fill(force, NEG_INF), n_pick, dim=-1)  # [T, n_pick]
    indices = indices.masked_fill(top_values == NEG_INF, num_experts)

    if rank is not None:
        indices = indices[:, rank:]  # [T, 1]
    elif top_p is not None:
        eligible_scores = full_scores.masked_fill(choice == NEG_INF, 0.0)
        normalized = eligible_scores / eligible_scores.sum(dim=-1, keepdim=True)
        mass = _gather(normalized, indices, 0.0).cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
        # keep up to the first crossing of p; p = 1 keeps every slot (a float sum may pass 1 by rounding)
        indices = indices.masked_fill((mass_before > top_p.p) & (top_p.p < 1.0), num_experts)
    elif len(forced_ids):
        order = forced_order_key[:, forced_ids].argsort(dim=-1, descending=True, stable=True)
        indices = torch.cat([indices, forced_ids[order]], dim=-1)  # forced experts take the last slots
    empty = indices == num_experts

    # 5. Weights of the selected experts.
    if rank is not None:
        weights = (~empty).float() * rule.scaling  # one expert at the family's full scale
    else:
        if rule.select_before_score:
            selected_logits = _gather(x, indices, NEG_INF)
            weights = score_of(selected_logits, rule.score).masked_fill(empty, 0.0)
        else:
            weights = _gather(full_scores, indices, 0.0)
        if top_p is not None and rule.score != "softmax":
            # per-expert scores are not probabilities: under top-p a weight is the expert's share of the
            # eligible score mass (what the prefix was measured in), on the family's scale
            weights = weights / full_scores.masked_fill(choice == NEG_INF, 0.0).sum(dim=-1, keepdim=True)
        renormalize = top_p.renormalize if top_p is not None else rule.renormalize
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * rule.scaling

    # 6. Intervene on the weights.
    if c.multiplier is not None:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights * _gather(c.multiplier.factors.float()[None].expand(num_tokens, -1), indices, 1.0)
        if c.multiplier.renormalize:
            weights = weights * _ratio(total, weights.sum(dim=-1, keepdim=True))
    if c.drop is not None:
        total = weights.sum(dim=-1, keepdim=True)
        dropped = _gather(c.drop.experts[None].expand(num_tokens, -1), indices, False)
        weights = weights.masked_fill(dropped, 0.0)
        if c.drop.renormalize:
            weights = weights * _ratio(total, weights.sum(dim=-1, keepdim=True))
    return weights, indices


def _limit_to_best_groups(choice: Tensor, rule: RoutingRule) -> Tensor:
    """Mask (-inf) the experts outside each token's best `topk_group` groups, as DeepSeek-V2/V3 do."""
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, rule.n_group, num_experts // rule.n_group)
    if rule.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        top2 = grouped.topk(2, dim=-1).values
        # A group with one eligible expert scores that expert alone (V3 never has ineligible experts).
        group_scores = top2[..., 0] + top2[..., 1].masked_fill(top2[..., 1] == NEG_INF, 0.0)
    group_idx = torch.topk(group_scores, k=rule.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
    return choice.masked_fill(~score_mask.bool(), NEG_INF)


def _gather(t: Tensor, indices: Tensor, fill: float | bool) -> Tensor:
    """t[token, indices] with `fill` at the sentinel index E (an extra column)."""
    padded = torch.cat([t, torch.full_like(t[:, :1], fill)], dim=-1)  # [T, E + 1]
    return padded.gather(1, indices)


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (every weight already 0)."""
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(denominator))


def _pad(t: Tensor, k: int, fill: float | int) -> Tensor:
    return torch.cat([t, torch.full_like(t[:, :1], fill).expand(-1, k - t.shape[1])], dim=-1)
