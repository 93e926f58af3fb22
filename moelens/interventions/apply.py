"""Apply an intervention spec to a live model: ``with intervene(model, spec): ...``.

Binding checks the spec against the model (layers, experts, top-k) and compiles each MoE layer's
parts into the per-layer vectors of :class:`moelens.kernels.routing.RoutingControls`. Applying
registers one forward hook per affected router (prepended, so any tracer sees the routing the
model actually used) that re-routes from the router's own logits through
:func:`moelens.kernels.routing.route`. No parameter or module is modified: leaving the block
removes the hooks, and the model is bitwise what it was, also when the body raised.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moelens.hooks.adapters import MoeLayer, adapter_for, moe_layers
from moelens.hooks.steps import StepTokens, decoder_stack
from moelens.interventions.spec import (
    Disable,
    Force,
    Intervention,
    LogitBias,
    Part,
    Prune,
    Rank,
    Reweight,
    SpecError,
    TokenScope,
    TopP,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moelens.kernels.routing import RoutingControls, RoutingRule

_ACTIVE: weakref.WeakKeyDictionary[Any, list[Intervention]] = weakref.WeakKeyDictionary()


def active_intervention(model: nn.Module) -> Intervention | None:
    """The combination of interventions currently applied to ``model`` (``None`` if none)."""
    stack = _ACTIVE.get(model)
    if not stack:
        return None
    combined = Intervention()
    for spec in stack:
        combined = combined + spec
    return combined


@dataclass(frozen=True)
class _ScopedControls:
    scope: TokenScope
    controls: RoutingControls


@dataclass(frozen=True)
class _LayerPlan:
    layer: MoeLayer
    rule: RoutingRule
    correction_bias: torch.Tensor | None
    scoped: tuple[_ScopedControls, ...]  # one entry per distinct token scope among the layer's parts


def bind(model: nn.Module, spec: Intervention) -> list[_LayerPlan]:
    """Check ``spec`` against ``model`` and compile it per MoE layer (raises :class:`SpecError`)."""
    adapter = adapter_for(model)
    layers = {layer.index: layer for layer in moe_layers(model)}
    num_layers = len(decoder_stack(model).layers)
    for part in spec.parts:
        for index in part.layers() or ():
            if index not in layers:
                where = "is dense (no router)" if 0 <= index < num_layers else f"is out of range: the model has layers 0-{num_layers - 1}"
                raise SpecError(f"{part.kind}: layer {index} {where}; MoE layers are {sorted(layers)}")
    plans = []
    for index, layer in layers.items():
        parts = [p for p in spec.parts if p.layers() is None or index in p.layers()]
        if not parts:
            continue
        # only a spec that changes routing needs the rule: tracing families without one stays possible
        rule = adapter.routing_rule(model.config)  # raises for families whose routing the kernel cannot reproduce
        scopes = list(dict.fromkeys(p.tokens for p in parts))
        bias_attr = adapter.correction_bias_attr
        plans.append(
            _LayerPlan(
                layer=layer,
                rule=rule,
                correction_bias=getattr(layer.router, bias_attr) if bias_attr else None,
                scoped=tuple(_ScopedControls(s, _compile(layer, rule, [p for p in parts if p.tokens == s])) for s in scopes),
            )
        )
    return plans


def _compile(layer: MoeLayer, rule: RoutingRule, parts: list[Part]) -> RoutingControls:
    """Fold one layer's parts (same token scope) into per-expert vectors."""
    import torch

    from moelens.kernels.routing import RoutingControls

    num_experts, index = layer.num_experts, layer.index
    device = layer.router.weight.device if hasattr(layer.router, "weight") else None
    disable = torch.zeros(num_experts, dtype=torch.bool)
    drop = torch.zeros(num_experts, dtype=torch.bool)
    force = torch.zeros(num_experts, dtype=torch.bool)
    multiplier = torch.ones(num_experts)
    bias = torch.zeros(num_experts)
    settings: dict[str, Any] = {}

    def experts_of(part: Part, ids: tuple[int, ...]) -> list[int]:
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise SpecError(f"{part.kind}: expert {bad[0]} in layer {index} is out of range: experts are 0-{num_experts - 1}")
        return list(ids)

    def setting(name: str, value: Any, part: Part) -> None:
        if settings.setdefault(name, value) != value:
            raise SpecError(f"{part.kind}: layer {index} gets two different values for {name} ({settings[name]!r} and {value!r}) in one token scope")

    for part in parts:
        if isinstance(part, Disable):
            target = disable if part.mode == "reroute" else drop
            target[experts_of(part, part.experts[index])] = True
            if part.mode == "drop":
                setting("drop_renormalize", part.renormalize, part)
        elif isinstance(part, Prune):
            keep = experts_of(part, part.keep[index])
            mask = torch.ones(num_experts, dtype=torch.bool)
            mask[keep] = False
            disable |= mask
        elif isinstance(part, Force):
            force[experts_of(part, part.experts[index])] = True
        elif isinstance(part, Reweight):
            multiplier[experts_of(part, part.experts[index])] *= part.factor
            setting("multiplier_renormalize", part.renormalize, part)
        elif isinstance(part, LogitBias):
            for expert, value in part.bias[index].items():
                bias[experts_of(part, (expert,))] += value
        elif isinstance(part, TopP):
            setting("top_p", part.p, part)
            setting("top_p_max_k", part.max_k, part)
            setting("top_p_renormalize", part.renormalize, part)
        elif isinstance(part, Rank):
            if part.rank > num_experts:
                raise SpecError(f"rank: rank {part.rank} is larger than the {num_experts} experts of layer {index}")
            setting("rank", part.rank, part)
    remaining = num_experts - int(disable.sum())
    if remaining < rule.top_k:
        raise SpecError(
            f"layer {index}: disabling/pruning leaves {remaining} of {num_experts} experts, fewer than top-k = {rule.top_k}; "
            "keep at least top-k experts (or use mode='drop')"
        )
    both = (force & (disable | drop)).nonzero().flatten().tolist()
    if both:
        raise SpecError(f"layer {index}: expert {both[0]} is both forced and disabled")
    if int(force.sum()) > rule.top_k:
        raise SpecError(f"force: {int(force.sum())} experts forced in layer {index}, but only top-k = {rule.top_k} slots exist")
    return RoutingControls(
        logit_bias=bias.to(device) if bias.any() else None,
        disable=disable.to(device) if disable.any() else None,
        force=force.to(device) if force.any() else None,
        drop=drop.to(device) if drop.any() else None,
        multiplier=multiplier.to(device) if (multiplier != 1).any() else None,
        **settings,
    )


def _scope_mask(scope: TokenScope, tokens: StepTokens, rows: slice | None) -> torch.Tensor | None:
    """[B*S] bool of the tokens a scope covers in this step; ``None`` = every token."""
    import torch

    batch, new = tokens.real.shape
    if scope == "all":
        mask = None
    elif scope == "prompt":
        mask = torch.full((batch, new), not tokens.generated, device=tokens.real.device)
    elif scope == "generated":
        mask = torch.full((batch, new), tokens.generated, device=tokens.real.device)
    else:
        mask = torch.isin(tokens.positions, torch.tensor(scope, device=tokens.positions.device))
    if rows is not None:
        row_mask = torch.zeros(batch, 1, dtype=torch.bool, device=tokens.real.device)
        row_mask[rows] = True
        mask = row_mask.expand(batch, new) if mask is None else mask & row_mask
    return None if mask is None else mask.reshape(-1)


def _reroute(plan: _LayerPlan, logits: torch.Tensor, step: StepTokens | None, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``logits`` [T, E] under the plan; tokens outside every scope route as the family does."""
    import dataclasses

    import torch

    from moelens.kernels.routing import route

    logits = logits.float()
    if len(plan.scoped) == 1 and plan.scoped[0].scope == "all" and rows is None:
        return route(logits, plan.rule, correction_bias=plan.correction_bias, controls=plan.scoped[0].controls)
    assert step is not None, "token-scoped interventions need the step bookkeeping hook"
    weights = indices = None
    for scoped in plan.scoped:
        mask = _scope_mask(scoped.scope, step, rows)
        controls = dataclasses.replace(scoped.controls, token_mask=mask)
        w, i = route(logits, plan.rule, correction_bias=plan.correction_bias, controls=controls)
        if weights is None:
            weights, indices = w, i
            continue
        width = max(weights.shape[-1], w.shape[-1])
        weights, indices = _pad_slots(weights, indices, width, plan.layer.num_experts)
        w, i = _pad_slots(w, i, width, plan.layer.num_experts)
        chosen = mask[:, None] if mask is not None else torch.ones_like(i, dtype=torch.bool)
        weights, indices = torch.where(chosen, w, weights), torch.where(chosen, i, indices)
    assert weights is not None and indices is not None
    return weights, indices


def _pad_slots(weights: torch.Tensor, indices: torch.Tensor, width: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [T, K] routing to ``width`` slots with empty slots (index E, weight 0)."""
    import torch.nn.functional as F

    extra = width - weights.shape[-1]
    return F.pad(weights, (0, extra), value=0.0), F.pad(indices, (0, extra), value=num_experts)


@contextmanager
def intervene(model: nn.Module, spec: Intervention, *, rows: slice | None = None) -> Iterator[Intervention]:
    """Apply ``spec`` to ``model`` inside the ``with`` block.

    Args:
        model: a supported MoE model whose routing rule the kernel reproduces (not PhiMoE).
        spec: an :class:`Intervention` (``disable(...) + reweight(...)`` ...); an empty
            ``Intervention()`` changes nothing and registers no hook.
        rows: restrict the intervention to these batch rows (e.g. ``slice(4, 8)``: one batch can
            hold the baseline and the steered copies of the same prompts).

    Raises :class:`SpecError` before touching the model if the spec does not fit it.
    """
    plans = bind(model, spec)
    # an empty spec (or one touching no layer) registers nothing: callers may pass Intervention()
    needs_steps = bool(plans) and (rows is not None or any(s.scope != "all" for plan in plans for s in plan.scoped))
    current: dict[str, StepTokens | None] = {"step": None}
    handles = []
    try:
        if needs_steps:
            def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                current["step"] = StepTokens.from_call(args, kwargs)

            handles.append(decoder_stack(model).register_forward_pre_hook(remember, with_kwargs=True, prepend=True))
        for plan in plans:
            handles.append(plan.layer.router.register_forward_hook(_router_hook(plan, current, rows), prepend=True))
        _ACTIVE.setdefault(model, []).append(spec)
        yield spec
    finally:
        for handle in handles:
            handle.remove()
        stack = _ACTIVE.get(model)
        if stack and spec in stack:
            stack.remove(spec)


def _router_hook(plan: _LayerPlan, current: dict[str, StepTokens | None], rows: slice | None) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        logits, weights = output[0], output[1]
        new_weights, new_indices = fill_empty_slots(*_reroute(plan, logits, current["step"], rows), plan.layer.num_experts)
        return (logits, new_weights.to(weights.dtype), new_indices, *output[3:])

    return hook


def fill_empty_slots(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Point empty slots (index E) at the token's first expert with weight 0.

    transformers' experts implementations skip the sentinel index E only under expert parallelism
    (grouped_mm with biases indexes out of bounds otherwise); a repeated expert with weight 0
    adds exactly nothing, and the tracer drops such repeats.
    """
    import torch

    empty = indices >= num_experts
    return torch.where(empty, 0.0, weights), torch.where(empty, indices[:, :1], indices)
