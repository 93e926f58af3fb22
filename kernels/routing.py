"""One parameterised routing function for every MoE family, with interventions.

Pipeline (per token):
    logits -> (+ logit_bias, disabled experts -> -inf)
           -> scores: softmax over all experts | sigmoid | sqrt(softplus) per expert   (skipped by select_before_score rules)
           -> choice = scores (+ correction_bias)             (select_before_score rules: logits (+ correction_bias))
           -> group-limited selection (n_group > 1): experts outside the best topk_group groups leave the choice
           -> select (controls.select): TopKSelect (forced experts take the last slots) | TopPSelect prefix
              | RankSelect: the rank-r expert (r counts from 0: 0 = the first choice)
           -> weights: gather scores (select_before_score: score function over the selected logits only)
           -> renormalise (rule.renormalize; TopPSelect.renormalize under top-p) -> scale
           -> (* MultiplyWeights.factors, optionally back to the pre-multiplication total)
           -> (DropWeights.experts -> 0, optionally back to the pre-drop total)

An expert is *eligible* when its choice score is finite: disabled experts and experts of unselected groups
are not. A slot with no eligible expert left is empty: it holds index E (the sentinel transformers' experts
implementations skip) and weight 0. Slots are ordered by descending choice score; forced experts come last,
ordered among themselves by descending choice score before group limiting (they bypass group limiting).

Three implementations share this contract: `reference` (clear, op by op; the ground truth), `torch_path`
(the fast CPU path) and `triton_routing` (the fused kernel).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Impl = Literal["auto", "reference", "torch", "triton"]
# softmax over a token's experts; or per expert: sigmoid, or sqrt(softplus) (DeepSeek-V4's "sqrtsoftplus")
Score = Literal["softmax", "sigmoid", "sqrtsoftplus"]
SCORES: tuple[Score, ...] = ("softmax", "sigmoid", "sqrtsoftplus")


def score_of(x: Tensor, score: Score) -> Tensor:
    """[T, E] float32 scores of logits ``x`` [T, E] (float32; -inf for excluded experts gives 0)."""
    if score == "softmax":
        return torch.softmax(x, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(x)
    return torch.sqrt(torch.nn.functional.softplus(x))


@dataclass(frozen=True)
class RoutingRule:
    """How a family routes. Inferred from each model's config and verified against its own routing by
    :mod:`moelens.hooks.routing_check`."""

    top_k: int
    score: Score
    select_before_score: bool = False  # GPT-OSS, Granite, Llama-4, Kolibri: top-k over raw logits (+ bias), then score the k
    renormalize: bool = False  # divide the selected weights by their sum (+1e-20, DeepSeek-V3's guard)
    scaling: float = 1.0  # DeepSeek routed_scaling_factor
    n_group: int = 1  # DeepSeek group-limited top-k
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"  # V2: max score per group; V3: sum of the top-2 choice scores


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make generated __eq__ ambiguous
class TopKSelect:
    """Select the rule's top_k experts per token (the family's own selection).

    force: [E] bool or None: experts put into every token's selected set, in the last slots, at most top_k of them
    (ordered among themselves by descending choice score, bypassing group limits).
    """

    force: Tensor | None = None


@dataclass(frozen=True)
class TopPSelect:
    """Select per token the smallest choice-ordered prefix whose normalised-score mass exceeds ``p`` (Dynamic-MoE).

    p: in (0, 1]; 1 keeps every eligible expert. max_k: cap on the prefix length in [1, E]; None = no cap (every
    expert, as in the paper). Weights are softmax probabilities or, for per-expert scores (sigmoid, sqrt(softplus)),
    each expert's share of the eligible score mass. renormalize: replaces rule.renormalize for these tokens (False:
    raw probabilities, the paper's).
    """

    p: float
    max_k: int | None = None
    renormalize: bool = False


@dataclass(frozen=True)
class RankSelect:
    """Select only each token's rank-``rank`` expert in choice order (SCMoE's weak pass); its weight is
    rule.scaling (1.0 for most families).

    rank: counts from 0 (0 = the router's first choice, 1 = the second), as a trace's ``routes.rank``; in
    [0, E - 1]. A token with fewer than rank + 1 eligible experts gets an empty slot.
    """

    rank: int


Selection = TopKSelect | TopPSelect | RankSelect
TOP_K = TopKSelect()  # the default selection: the family's own top-k, nothing forced


@dataclass(frozen=True, eq=False)
class MultiplyWeights:
    """Multiply the selected experts' weights (RICE): ``factors`` [E] float, finite and > 0.

    renormalize: rescale each token's weights back to their pre-multiplication total.
    """

    factors: Tensor
    renormalize: bool = False


@dataclass(frozen=True, eq=False)
class DropWeights:
    """Zero the weights of selected experts after selection: ``experts`` [E] bool (still chosen, contribute nothing).

    renormalize: rescale the remaining weights to the token's pre-drop total (MoTE's switch-off); False loses the
    dropped weight (the super-experts experiment).
    """

    experts: Tensor
    renormalize: bool = False


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make generated __eq__ ambiguous
class RoutingControls:
    """Per-layer intervention vectors; one launch covers any combination.

    Every part is optional, and each renormalisation belongs to the part it undoes, so no combination of fields is
    contradictory: forcing exists only within top-k selection, top-p and rank are alternative selections.
    Vectors are [E] on the logits' device. Treat the tensors as immutable: their values are validated, and turned
    into what the routing passes consume, once per object (per expert count and top_k).
    """

    logit_bias: Tensor | None = None  # [E] float, added to the logits
    disable: Tensor | None = None  # [E] bool, reroute: excluded from choice, the next-best expert takes the slot
    select: Selection = TOP_K  # how slots are filled: TopKSelect (+ forced experts), TopPSelect or RankSelect
    multiplier: MultiplyWeights | None = None  # applied to the selected weights first
    drop: DropWeights | None = None  # then dropped experts' weights are zeroed

    @property
    def force(self) -> Tensor | None:
        """[E] bool forced experts, or None (forcing exists only under top-k selection)."""
        return self.select.force if isinstance(self.select, TopKSelect) else None


def num_slots(rule: RoutingRule, controls: RoutingControls | None, num_experts: int, *, masked: bool = False) -> int:
    """K, the width of `route`'s outputs: top_k; the top-p cap (``max_k``, else E) under TopPSelect; 1 under RankSelect.

    ``masked`` (`route` was given a token_mask): the tokens outside it still need top_k slots, so K is at least top_k.
    """
    if controls is None:
        return rule.top_k
    select = controls.select
    if isinstance(select, RankSelect):
        k = 1
    elif isinstance(select, TopPSelect):
        k = top_p_cap(select, num_experts)
    else:
        k = rule.top_k
    return max(k, rule.top_k) if masked else k


def top_p_cap(select: TopPSelect, num_experts: int) -> int:
    """The most experts a top-p prefix may hold: ``select.max_k``, or every expert (E) when it is None."""
    return select.max_k or num_experts


def route(
    logits: Tensor,
    rule: RoutingRule,
    *,
    correction_bias: Tensor | None = None,
    controls: RoutingControls | None = None,
    token_mask: Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[Tensor, Tensor]:
    """Route tokens: logits [T, E] -> (weights [T, K] float32, indices [T, K] int64).

    token_mask: [T] bool, the tokens ``controls`` apply to; the others are routed with no controls (the family's
    routing), in the same launch. It is per-call data, unlike the controls (built once per spec and cached).
    K is given by `num_slots` (E = logits.shape[1]; ``masked=`` whether a token_mask was given). Empty slots
    hold index E and weight 0. Slots are ordered by descending choice score, forced experts last. With no controls the result equals the family's own router (indices exactly,
    up to order where the family uses sorted=False top-k; weights to float tolerance).
    `impl="auto"` runs the Triton kernel on CUDA tensors and the fast torch path otherwise.
    Raises ValueError (bad values) or TypeError (bad dtypes) naming the offending input and its valid range.
    """
    validate(logits, rule, correction_bias, controls, token_mask)
    if impl == "auto":
        impl = "triton" if logits.is_cuda else "torch"
    fn = _IMPLS.get(impl) or _load_impl(impl)
    return fn(logits, rule, correction_bias=correction_bias, controls=controls, token_mask=token_mask)


_IMPLS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}


def choice_scores(logits: Tensor, rule: RoutingRule, correction_bias: Tensor | None = None) -> Tensor:
    """[T, E] float32 the scores experts are chosen by, without interventions or group limits: the
    logits (+ correction_bias) for select_before_score rules, else score(logits) (+ correction_bias)."""
    x = logits.float()
    if rule.select_before_score:
        return x if correction_bias is None else x + correction_bias.float()
    scores = score_of(x, rule.score)
    return scores if correction_bias is None else scores + correction_bias.float()


def _load_impl(impl: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Import an implementation on first use: triton is imported only when the Triton kernel is asked for."""
    if impl == "reference":
        from .reference import route_reference as fn
    elif impl == "torch":
        from .torch_path import route_torch as fn
    elif impl == "triton":
        from .triton_routing import route_triton as fn
    else:
        raise ValueError(f"impl={impl!r} is not one of 'auto', 'reference', 'torch', 'triton'")
    _IMPLS[impl] = fn
    return fn


def validate(
    logits: Tensor,
    rule: RoutingRule,
    correction_bias: Tensor | None,
    controls: RoutingControls | None,
    token_mask: Tensor | None = None,
) -> None:
    """Check shapes, dtypes and values of `route`'s inputs; raise with what is wrong and how to fix it."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float [T, E] tensor, got {logits.dtype} of shape {tuple(logits.shape)}; "
            "flatten batch and sequence dimensions first"
        )
    num_tokens, num_experts = logits.shape
    _validate_rule(rule, num_experts)
    if correction_bias is not None:
        _check_vector("correction_bias", correction_bias, num_experts, logits.device, float)
    _check_vector("token_mask", token_mask, num_tokens, logits.device, bool)
    if controls is None:
        return
    c = controls
    _check_part("select", c.select, (TopKSelect, TopPSelect, RankSelect))
    _check_part("multiplier", c.multiplier, (MultiplyWeights,))
    _check_part("drop", c.drop, (DropWeights,))
    _check_vector("logit_bias", c.logit_bias, num_experts, logits.device, float)
    _check_vector("multiplier", c.multiplier.factors if c.multiplier is not None else None, num_experts, logits.device, float)
    for name, mask in (("disable", c.disable), ("force", c.force), ("drop", c.drop.experts if c.drop is not None else None)):
        _check_vector(name, mask, num_experts, logits.device, bool)
    if _validated.get(c) == (num_experts, rule.top_k):
        return  # the value checks below read the tensors (a sync each on GPU): once per controls object
    _validate_control_values(c, rule, num_experts)
    _validated[c] = (num_experts, rule.top_k)


_validated: weakref.WeakKeyDictionary[RoutingControls, tuple[int, int]] = weakref.WeakKeyDictionary()


def _validate_control_values(c: RoutingControls, rule: RoutingRule, num_experts: int) -> None:
    if c.disable is not None and bool(c.disable.all()):
        raise ValueError(
            f"disable masks all {num_experts} experts of the layer; leave at least one expert enabled"
        )
    if c.force is not None:
        n_forced = int(c.force.sum())
        if n_forced > rule.top_k:
            raise ValueError(
                f"force selects {n_forced} experts but the layer routes to top_k={rule.top_k}; "
                f"force at most {rule.top_k} experts"
            )
        if c.disable is not None and bool((c.force & c.disable).any()):
            both = (c.force & c.disable).nonzero().flatten().tolist()
            raise ValueError(f"experts {both} are both forced and disabled; choose one of the two for each")
    if c.multiplier is not None:
        factors = c.multiplier.factors
        bad = ~(factors > 0) | ~torch.isfinite(factors)
        if bool(bad.any()):
            ids = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"multiplier must be finite and > 0, got {factors[bad].tolist()} for experts {ids}; "
                "use drop to zero an expert's weight"
            )
    select = c.select
    if isinstance(select, TopPSelect):
        if not 0.0 < select.p <= 1.0:
            raise ValueError(f"TopPSelect p={select.p} is outside (0, 1]")
        if select.max_k is not None and not 1 <= select.max_k <= num_experts:
            raise ValueError(f"TopPSelect max_k={select.max_k} is outside [1, {num_experts}] (the number of experts)")
    elif isinstance(select, RankSelect) and not 0 <= select.rank < num_experts:
        raise ValueError(
            f"RankSelect rank={select.rank} is outside [0, {num_experts - 1}]; "
            "rank r counts from 0 (0 = the router's first choice)"
        )


def _check_part(name: str, value: object, kinds: tuple[type, ...]) -> None:
    """Refuse a field holding something other than its variant types (e.g. a bare tensor for ``drop``)."""
    if value is None and name != "select":
        return
    if not isinstance(value, kinds):
        names = " | ".join(k.__name__ for k in kinds) + ("" if name == "select" else " | None")
        raise TypeError(f"controls.{name} must be {names}, got {type(value).__name__}; e.g. "
                        + {"select": "TopPSelect(0.9)", "multiplier": "MultiplyWeights(factors)",
                           "drop": "DropWeights(mask, renormalize=True)"}[name])


def _validate_rule(rule: RoutingRule, num_experts: int) -> None:
    if not 1 <= rule.top_k <= num_experts:
        raise ValueError(f"rule.top_k={rule.top_k} is outside [1, {num_experts}] (the number of experts)")
    if rule.score not in SCORES or rule.group_score not in ("max", "top2_sum"):
        raise ValueError(f"rule has an unknown score {rule.score!r} or group_score {rule.group_score!r}")
    if rule.n_group < 1 or num_experts % rule.n_group:
        raise ValueError(f"rule.n_group={rule.n_group} must be >= 1 and divide the {num_experts} experts")
    if rule.n_group > 1:
        if rule.select_before_score:
            raise ValueError("group-limited selection (n_group > 1) needs a score-first rule")
        if not 1 <= rule.topk_group <= rule.n_group:
            raise ValueError(f"rule.topk_group={rule.topk_group} is outside [1, n_group={rule.n_group}]")
        if rule.group_score == "top2_sum" and num_experts // rule.n_group < 2:
            raise ValueError(f"group_score='top2_sum' needs groups of >= 2 experts, got {num_experts // rule.n_group}")
        if rule.topk_group * (num_experts // rule.n_group) < rule.top_k:
            raise ValueError(
                f"rule.topk_group={rule.topk_group} groups of {num_experts // rule.n_group} experts "
                f"cannot fill top_k={rule.top_k} slots"
            )


def _check_vector(name: str, v: Tensor | None, length: int, device: torch.device, kind: type) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor) or v.shape != (length,):
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a tensor of shape ({length},), got {shape}")
    if kind is bool and v.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {v.dtype}; use a mask such as `ids == e`")
    if kind is float and not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the logits are on {device}; move it with .to(logits.device)")
