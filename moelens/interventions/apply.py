"""Apply an intervention spec to a live model: ``with intervene(model, spec): ...``.

Binding checks the spec against the model (layers, experts, top-k) and compiles each MoE layer's
parts into the per-layer vectors of :class:`moelens.kernels.routing.RoutingControls`, under the
model's routing rule as inferred and verified by :mod:`moelens.hooks.routing_check`. Each model
has one intervention session: whatever the number of nested ``intervene`` blocks, it binds the
union of the active specs and is the one *rewriter* of the model's observation sites
(:mod:`moelens.hooks.sites`): per affected MoE layer, the ``top_k_index`` / ``top_k_weights`` the
experts receive are replaced by :func:`moelens.kernels.routing.route` of the router's logits
(where the experts take no routing, Llama 4, the dense score matrix the router returns), before
any tracer reads them. A rewrite per block would discard what an outer block's did. No parameter
or module is modified: leaving the last block removes the hooks, and the model is bitwise what it
was, also when the body raised.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moelens.hooks.adapters import MoeLayer, alive, correction_bias_of, expert_scale_of, fill_empty_slots, moe_view
from moelens.hooks.routing_check import RouterReading, RoutingCheck, routing_check, scaled_by_expert
from moelens.hooks.sites import sites_of
from moelens.hooks.steps import StepTokens
from moelens.interventions.spec import (
    Disable,
    Drop,
    Force,
    Intervention,
    LogitBias,
    Keep,
    Part,
    Rank,
    Reweight,
    SpecError,
    TokenScope,
    TopK,
    TopP,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moelens.kernels.routing import RoutingControls, RoutingRule

def active_intervention(model: nn.Module) -> Intervention | None:
    """The combination of interventions currently applied to ``model`` (``None`` if none)."""
    session = _SESSIONS.get(moe_view(model).stack)
    if session is None or not session.entries:
        return None
    combined = Intervention()
    for entry in session.entries:
        combined = combined + entry.spec
    return combined


Rows = tuple[int, "int | None"]  # a batch-row range [start, stop), stop None = to the end


@dataclass(frozen=True)
class _Group:
    """The parts of the active specs that cover the same tokens: one token scope, one row range."""

    scope: TokenScope
    rows: Rows | None

    @property
    def universal(self) -> bool:
        return self.scope == "all" and self.rows is None


@dataclass(frozen=True)
class _Variant:
    """The controls of the tokens that lie in exactly the groups ``members`` (indices into the plan's groups)."""

    members: tuple[int, ...]
    controls: RoutingControls
    rule: RoutingRule  # the layer's rule, with fewer slots under a top_k part


@dataclass(frozen=True)
class _Placed:
    """A plan's tensors on one device."""

    correction_bias: torch.Tensor | None
    expert_scale: torch.Tensor | None
    variants: tuple[_Variant, ...]


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's compiled routing. Controls are built on the CPU and copied, once per
    device, to wherever the router computes (:meth:`on`): with ``device_map`` and offloading, a
    router's parameters may sit on ``meta`` between calls, so nothing is placed at bind time."""

    layer: MoeLayer
    rule: RoutingRule
    reading: RouterReading  # how the router's tensors enter the kernel (see routing_check)
    correction_bias: torch.Tensor | None  # [E], when the reading adds it
    expert_scale: torch.Tensor | None  # [E], when the reading applies it
    groups: tuple[_Group, ...]
    variants: tuple[_Variant, ...]  # one per combination of groups a token can be in
    _placed: dict[Any, _Placed] = field(default_factory=dict, compare=False, repr=False)

    @property
    def needs_steps(self) -> bool:
        """Whether routing needs the step's tokens: some part covers only some tokens or rows."""
        return not all(group.universal for group in self.groups)

    def on(self, device: torch.device) -> _Placed:
        """The plan's tensors on ``device`` (copied once per device)."""
        import dataclasses

        import torch

        if device not in self._placed:
            def moved(part: Any) -> Any:  # the controls and their parts (selection, multiplier, drop), tensors moved
                changes = {}
                for f in dataclasses.fields(part):
                    value = getattr(part, f.name)
                    if isinstance(value, torch.Tensor):
                        changes[f.name] = value.to(device)
                    elif dataclasses.is_dataclass(value):
                        changes[f.name] = moved(value)
                return dataclasses.replace(part, **changes) if changes else part

            def to(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return tensor.to(device) if tensor is not None else None

            variants = tuple(_Variant(v.members, moved(v.controls), v.rule) for v in self.variants)
            self._placed[device] = _Placed(to(self.correction_bias), to(self.expert_scale), variants)
        return self._placed[device]


@dataclass(frozen=True)
class _Entry:
    """One active ``intervene`` block."""

    spec: Intervention
    rows: Rows | None


def bind(model: nn.Module, spec: Intervention) -> list[LayerPlan]:
    """Check ``spec`` against ``model`` and compile it per MoE layer (raises :class:`SpecError`)."""
    return _bind(model, [_Entry(spec, None)])


def _rows(rows: slice | None) -> Rows | None:
    if rows is None:
        return None
    if rows.step not in (None, 1) or (rows.start or 0) < 0 or (rows.stop is not None and rows.stop < 0):
        raise SpecError(f"rows={rows}: use a contiguous slice of batch rows with non-negative bounds, e.g. slice(4, 8)")
    return (rows.start or 0, rows.stop)


def _bind(model: nn.Module, entries: list[_Entry]) -> list[LayerPlan]:
    """Compile the union of ``entries`` per MoE layer.

    Parts are grouped by the tokens they cover (token scope x row range). A token in several
    groups gets every part of all of them, compiled together: stacking blocks acts exactly like
    adding their specs. Every combination of groups that tokens can share is compiled here, so a
    conflict (two top-p values for the same tokens) is a :class:`SpecError` before anything runs.
    """
    view = moe_view(model)
    layers = {layer.index: layer for layer in view.layers}
    num_layers = view.num_decoder_layers
    for entry in entries:
        for part in entry.spec.parts:
            for index in part.touched_layers() or ():
                if index not in layers:
                    where = "is dense (no router)" if 0 <= index < num_layers else f"is out of range: the model has layers 0-{num_layers - 1}"
                    raise SpecError(f"{part.kind}: layer {index} {where}; MoE layers are {sorted(layers)}")
    plans = []
    check: RoutingCheck | None = None
    for index, layer in layers.items():
        grouped: dict[_Group, list[Part]] = {}
        for entry in entries:
            for part in entry.spec.parts:
                if part.touched_layers() is None or index in part.touched_layers():
                    grouped.setdefault(_Group(part.tokens, entry.rows), []).append(part)
        if not grouped:
            continue
        # only a spec that changes a layer's routing needs its rule: tracing layers without one stays possible
        check = check or routing_check(model)  # once per bind, and only when a spec touches a layer
        routing = check.steerable(index)  # raises for a layer whose routing the kernel does not reproduce
        rule, reading = routing.rule, routing.reading
        assert rule is not None
        groups = tuple(grouped)
        variants = tuple(
            _Variant(members, *_compile(layer, rule, [p for i in members for p in grouped[groups[i]]]))
            for members in _combinations(groups)
        )
        plans.append(
            LayerPlan(
                layer=layer,
                rule=rule,
                reading=reading,
                correction_bias=correction_bias_of(layer) if reading.correction_bias else None,
                expert_scale=expert_scale_of(layer) if reading.expert_scale else None,
                groups=groups,
                variants=variants,
            )
        )
    return plans


def _combinations(groups: tuple[_Group, ...]) -> list[tuple[int, ...]]:
    """The sets of groups one token can lie in at once (non-empty; universal groups always in)."""
    from itertools import combinations

    universal = {i for i, g in enumerate(groups) if g.universal}
    out = []
    for size in range(1, len(groups) + 1):
        for members in combinations(range(len(groups)), size):
            chosen = [groups[i] for i in members]
            if not universal <= set(members):
                continue
            if {"prompt", "generated"} <= {g.scope for g in chosen}:
                continue  # a token is either a prompt token or a generated one
            if not _rows_overlap([g.rows for g in chosen if g.rows is not None]):
                continue
            out.append(members)
    return out


def _rows_overlap(ranges: list[Rows]) -> bool:
    start = max((first for first, _ in ranges), default=0)
    stops = [stop for _, stop in ranges if stop is not None]
    return not stops or start < min(stops)


def _compile(layer: MoeLayer, rule: RoutingRule, parts: list[Part]) -> tuple[RoutingControls, RoutingRule]:
    """Fold one layer's parts (same token scope) into per-expert vectors, and the rule they route under."""
    import dataclasses

    import torch

    from moelens.kernels.routing import (
        DropWeights,
        MultiplyWeights,
        RankSelect,
        RoutingControls,
        Selection,
        TopKSelect,
        TopPSelect,
    )

    num_experts, index = layer.num_experts, layer.index
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
            raise SpecError(f"{part.kind}: layer {index} gets two different values for {name} ({settings[name]!r} and {value!r}) for the same tokens")

    for part in parts:
        if isinstance(part, Disable):
            dropped = isinstance(part.mode, Drop)
            (drop if dropped else disable)[experts_of(part, part.experts[index])] = True
            if dropped:
                setting("drop renormalize", part.mode.renormalize, part)
        elif isinstance(part, Keep):
            keep = experts_of(part, part.experts[index])
            mask = torch.ones(num_experts, dtype=torch.bool)
            mask[keep] = False
            disable |= mask
        elif isinstance(part, Force):
            force[experts_of(part, part.experts[index])] = True
        elif isinstance(part, Reweight):
            multiplier[experts_of(part, part.experts[index])] *= part.factor
            setting("reweight renormalize", part.renormalize, part)
        elif isinstance(part, LogitBias):
            for expert, value in part.bias[index].items():
                bias[experts_of(part, (expert,))] += value
        elif isinstance(part, TopP):
            setting("top_p", part.p, part)
            setting("top_p max_k", part.max_k, part)
            setting("top_p renormalize", part.renormalize, part)
        elif isinstance(part, TopK):
            if part.k > rule.top_k:
                raise SpecError(f"top_k: k = {part.k} in layer {index} exceeds the family's top-k = {rule.top_k}")
            setting("top_k", part.k, part)  # the family's own rule with fewer slots
        elif isinstance(part, Rank):
            if part.rank >= num_experts:
                raise SpecError(
                    f"rank: rank {part.rank} is out of range for the {num_experts} experts of layer {index} (ranks 0-{num_experts - 1}); "
                    "rank r counts from 0 (0 = the router's first choice)"
                )
            setting("rank", part.rank, part)
    routed = dataclasses.replace(rule, top_k=settings.pop("top_k")) if "top_k" in settings else rule
    remaining = num_experts - int(disable.sum())
    if remaining < rule.top_k:
        raise SpecError(
            f"layer {index}: disabling/keeping leaves {remaining} of {num_experts} experts, fewer than top-k = {rule.top_k}; "
            "keep at least top-k experts (or use mode='drop')"
        )
    if "rank" in settings:
        # a token with fewer eligible experts than rank + 1 would get no expert at all: its one slot empty.
        # Group-limited rules open a token's best topk_group groups; a group with no eligible expert
        # is never chosen ahead of one with some, so the fewest a token can have is the sum of the
        # topk_group smallest non-zero group counts
        eligible = ~disable
        if rule.n_group > 1:
            per_group = eligible.view(rule.n_group, -1).sum(dim=1)
            fewest = int(per_group[per_group > 0].sort().values[: rule.topk_group].sum())
        else:
            fewest = int(eligible.sum())
        if settings["rank"] >= fewest:
            raise SpecError(
                f"rank: rank {settings['rank']} in layer {index} needs {settings['rank'] + 1} eligible experts per token, "
                f"but a token may have as few as {fewest} ({int(disable.sum())} of {num_experts} experts disabled"
                f"{', routing within ' + str(rule.topk_group) + ' of ' + str(rule.n_group) + ' groups' if rule.n_group > 1 else ''}); "
                f"use a rank below {fewest} (rank counts from 0)"
            )
    both = (force & (disable | drop)).nonzero().flatten().tolist()
    if both:
        raise SpecError(f"layer {index}: expert {both[0]} is both forced and disabled")
    if int(force.sum()) > routed.top_k:
        raise SpecError(f"force: {int(force.sum())} experts forced in layer {index}, but only top-k = {routed.top_k} slots exist")
    selections = [name for name in ("top_p", "rank") if name in settings] + (["force"] if force.any() else [])
    if len(selections) > 1:
        raise SpecError(
            f"layer {index}: {' and '.join(selections)} apply to the same tokens; they are alternative selections "
            "(top-p and rank choose per-token slot counts, force fills top-k slots); give them different tokens"
        )
    select: Selection = TopKSelect(force=force if force.any() else None)
    if "top_p" in settings:
        select = TopPSelect(settings["top_p"], max_k=settings["top_p max_k"], renormalize=settings["top_p renormalize"])
    elif "rank" in settings:
        select = RankSelect(settings["rank"])
    controls = RoutingControls(
        logit_bias=bias if bias.any() else None,
        disable=disable if disable.any() else None,
        select=select,
        drop=DropWeights(drop, renormalize=settings["drop renormalize"]) if drop.any() else None,
        multiplier=MultiplyWeights(multiplier, renormalize=settings["reweight renormalize"]) if (multiplier != 1).any() else None,
    )
    return controls, routed


def _group_mask(group: _Group, tokens: StepTokens) -> torch.Tensor:
    """[B*S] bool: the tokens of this step that the group covers."""
    import torch

    batch, new = tokens.real.shape
    device = tokens.real.device
    if group.scope == "all":
        mask = torch.ones(batch, new, dtype=torch.bool, device=device)
    elif group.scope == "prompt":
        mask = torch.full((batch, new), not tokens.generated, device=device)
    elif group.scope == "generated":
        mask = torch.full((batch, new), tokens.generated, device=device)
    else:
        mask = torch.isin(tokens.positions, torch.tensor(group.scope, device=tokens.positions.device))
    if group.rows is not None:
        row_mask = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        row_mask[slice(*group.rows)] = True
        mask = mask & row_mask
    return mask.reshape(-1)


def reroute(plan: LayerPlan, logits: torch.Tensor, step: StepTokens | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices) [T, K] of the router's ``logits`` [T, E] under the plan, empty slots
    filled (:func:`fill_empty_slots`); tokens outside every group route as the family does.
    ``step`` is needed only by token- or row-scoped plans."""
    weights, indices = _routed(plan, logits, step)
    return fill_empty_slots(weights, indices, plan.layer.num_experts)


def _routed(plan: LayerPlan, logits: torch.Tensor, step: StepTokens | None) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    from moelens.kernels.routing import route

    logits = plan.reading.kernel_logits(logits)
    placed = plan.on(logits.device)
    bias = placed.correction_bias
    if not plan.needs_steps:  # one universal group: the same controls for every token
        (variant,) = placed.variants
        weights, indices = route(logits, variant.rule, correction_bias=bias, controls=variant.controls)
        return scaled_by_expert(weights, indices, placed.expert_scale), indices
    if step is None:
        raise SpecError(
            f"layer {plan.layer.index}: a token- or row-scoped intervention needs the step's tokens, but the layer ran "
            "outside a forward call of the model's decoder stack: a block called directly, or a layer recomputed "
            "during backward under activation checkpointing (which step it belongs to is not known there). Call the "
            "model, disable activation checkpointing, or apply the intervention to all tokens (tokens='all', no rows=)"
        )
    segments = _row_segments(plan.groups, step)
    if segments is not None:  # every token routed once, under the controls of its row segment
        variants = {variant.members: variant for variant in placed.variants}
        batch, tokens_per_row = step.real.shape
        if logits.shape[0] != batch * tokens_per_row:
            raise RuntimeError(
                f"layer {plan.layer.index}: the router scored {logits.shape[0]} tokens in a step of {batch} x {tokens_per_row}; "
                "a token- or row-scoped intervention needs one router row per token of the step"
            )
        parts = []
        for start, stop, members in segments:
            rows = logits[start * tokens_per_row : stop * tokens_per_row]  # [rows x S, E], a view
            variant = variants.get(members)
            parts.append(
                route(rows, variant.rule, correction_bias=bias, controls=variant.controls)
                if variant is not None
                else route(rows, plan.rule, correction_bias=bias)  # in no group: the family's routing
            )
        if len(parts) == 1:
            weights, indices = parts[0]
        else:  # segments may hold different slot counts (top_k, top_p): pad with empty slots
            width = max(w.shape[-1] for w, _ in parts)
            padded = [_pad_slots(w, i, width, plan.layer.num_experts) for w, i in parts]
            weights, indices = torch.cat([w for w, _ in padded]), torch.cat([i for _, i in padded])
        return scaled_by_expert(weights, indices, placed.expert_scale), indices
    # explicit positions: which tokens a group covers is known on the device only
    in_group = torch.stack([_group_mask(group, step) for group in plan.groups]).to(logits.device)  # [G, T]

    def tokens_of(variant: _Variant) -> torch.Tensor:
        members = torch.zeros(len(plan.groups), dtype=torch.bool, device=in_group.device)
        members[list(variant.members)] = True
        return (in_group == members[:, None]).all(dim=0)  # [T] in exactly these groups

    variants = list(placed.variants)
    # one launch routes a variant's tokens under its controls and all others as the family does,
    # when the variant keeps the family's rule (a top_k part changes it)
    base = next((v for v in variants if v.rule == plan.rule), None)
    if base is None:
        weights, indices = route(logits, plan.rule, correction_bias=bias)
    else:
        variants.remove(base)
        weights, indices = route(logits, plan.rule, correction_bias=bias, controls=base.controls, token_mask=tokens_of(base))
    for variant in variants:
        mask = tokens_of(variant)
        w, i = route(logits, variant.rule, correction_bias=bias, controls=variant.controls)
        width = max(weights.shape[-1], w.shape[-1])
        weights, indices = _pad_slots(weights, indices, width, plan.layer.num_experts)
        w, i = _pad_slots(w, i, width, plan.layer.num_experts)
        weights, indices = torch.where(mask[:, None], w, weights), torch.where(mask[:, None], i, indices)
    return scaled_by_expert(weights, indices, placed.expert_scale), indices


def _row_segments(groups: tuple[_Group, ...], step: StepTokens) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """The step's batch cut into row ranges [start, stop) in which each group covers every token
    or none, with the groups covering them (adjacent ranges with the same groups merged); ``None``
    when a group covers explicit positions. Known on the host: scopes by prompt or generated
    tokens cover whole steps, row ranges whole rows."""
    if any(isinstance(group.scope, tuple) for group in groups):
        return None
    batch = step.real.shape[0]

    def bound(row: int | None) -> int:
        return batch if row is None else min(row, batch)

    cuts = sorted({0, batch, *(bound(row) for group in groups if group.rows is not None for row in group.rows)})
    segments: list[tuple[int, int, tuple[int, ...]]] = []
    for start, stop in zip(cuts, cuts[1:]):
        members = tuple(
            i
            for i, group in enumerate(groups)
            if group.scope in ("all", "generated" if step.generated else "prompt")
            and (group.rows is None or group.rows[0] <= start < bound(group.rows[1]))
        )
        if segments and segments[-1][2] == members:
            segments[-1] = (segments[-1][0], stop, members)
        else:
            segments.append((start, stop, members))
    return segments


def _pad_slots(weights: torch.Tensor, indices: torch.Tensor, width: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [T, K] routing to ``width`` slots with empty slots (index E, weight 0)."""
    import torch.nn.functional as F

    extra = width - weights.shape[-1]
    return F.pad(weights, (0, extra), value=0.0), F.pad(indices, (0, extra), value=num_experts)


@dataclass(frozen=True)
class _Rerouting:
    """The compiled plans of the active specs: the model sites' rewriter (:class:`moelens.hooks.sites.Rewriter`)."""

    plans: dict[int, LayerPlan]  # MoE layer index -> its plan

    @property
    def layers(self) -> frozenset[int]:
        return frozenset(self.plans)

    @property
    def needs_steps(self) -> bool:
        return any(plan.needs_steps for plan in self.plans.values())

    def reroute(self, layer: MoeLayer, logits: torch.Tensor, tokens: StepTokens | None) -> tuple[torch.Tensor, torch.Tensor]:
        return reroute(self.plans[layer.index], logits, tokens)


class _Session:
    """The interventions active on one model, whatever the number of nested ``intervene`` blocks.
    Each block entering or leaving rebinds the union of the active specs and hands the model's
    sites the new rewriter."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)  # weak: the session is the value of a dict keyed weakly on the model
        self.entries: list[_Entry] = []
        self._lock = threading.RLock()  # a widget's worker thread may enter or leave a block meanwhile

    @property
    def model(self) -> nn.Module:
        return alive(self._model)

    @property
    def gone(self) -> bool:
        """Whether the model object this session was made for no longer exists."""
        return self._model() is None

    def push(self, entry: _Entry) -> None:
        with self._lock:
            plans = _bind(self.model, [*self.entries, entry])  # raises before anything changes
            self.entries.append(entry)
            try:
                self._install(plans)
            except BaseException:
                self._end_all()
                raise

    def pop(self, entry: _Entry) -> None:
        with self._lock:
            self.entries = [e for e in self.entries if e is not entry]
            try:
                self._install(_bind(self.model, self.entries) if self.entries else [])
            except SpecError as error:
                # the model changed inside the blocks (e.g. its routers were trained): what is left
                # no longer binds. Nothing may stay steered by the leaving block: every block ends.
                self._end_all()
                raise SpecError(
                    f"leaving an intervene block: the interventions still active no longer fit the model ({error}); "
                    "all intervene blocks on this model are now inactive"
                ) from error
            except BaseException:
                self._end_all()
                raise

    def _end_all(self) -> None:
        self.entries = []
        self._install([])

    def _install(self, plans: list[LayerPlan]) -> None:
        sites_of(self.model).rewrite(_Rerouting({plan.layer.index: plan for plan in plans}) if plans else None)


# keyed by the decoder stack, as the sites are: a causal-LM wrapper and its base model share one session
_SESSIONS: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()


@contextmanager
def intervene(model: nn.Module, spec: Intervention, *, rows: slice | None = None) -> Iterator[Intervention]:
    """Apply ``spec`` to ``model`` inside the ``with`` block.

    Args:
        model: a supported MoE model whose routing rule the kernel reproduces (not PhiMoE).
        spec: an :class:`Intervention` (``disable(...) + reweight(...)`` ...); an empty
            ``Intervention()`` changes nothing and registers no hook.
        rows: restrict the intervention to these batch rows (e.g. ``slice(4, 8)``: one batch can
            hold the baseline and the steered copies of the same prompts); a slice with step 1.

    Nested blocks compose: inside ``with intervene(m, a): with intervene(m, b):`` every token gets
    exactly what ``a + b`` gives it (on the rows each block covers), in either nesting order.
    Raises :class:`SpecError` before touching the model if the spec does not fit it or conflicts
    with an active block (two top-p values for the same tokens).
    """
    entry = _Entry(spec, _rows(rows))
    stack = moe_view(model).stack
    session = _SESSIONS.get(stack)
    if session is None or session.gone:
        session = _SESSIONS[stack] = _Session(model)
    session.push(entry)
    try:
        yield spec
    finally:
        session.pop(entry)

