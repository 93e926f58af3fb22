"""A model's routing rule, inferred from its config and verified against its own routing.

moelens steers a layer by re-routing its router logits through one routing kernel
(:func:`moelens.kernels.routing.route`) parameterised by a :class:`RoutingRule`. That is only
sound if the rule reproduces what the model does, so the rule is never taken on trust:

1. **Observe.** Every MoE block is called on the same seeded random hidden rows (in the model's
   dtype, on the block's device; a block that needs more than hidden states, such as a decoder
   layer holding the router itself, gets one forward pass of the model on random ids); hooks record the router's logits and the routing the experts
   module actually received (``top_k_index``, ``top_k_weights``), after everything the family's
   block did in between.
2. **Infer.** Candidate rules are built from the config and the router (score function, top-k
   before or after scoring, renormalisation, routed scaling, group-limited selection, a
   score-correction bias); the config's own values come first.
3. **Verify.** A rule is accepted when, at every MoE layer and on every token, the kernel chooses
   the same experts (as a set; rows whose k-th and (k+1)-th choice scores tie within the dtype's
   resolution are not compared) and gives the same weights within the dtype's tolerance.

A family no candidate reproduces (a hash router, PhiMoE's sparsemixer, capacity limits...) is
still traced exactly, since tracing reads the experts' inputs, but interventions are refused with
what differed for the config's rule, e.g. "weights differ at layer 1: ...".
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moelens.hooks.adapters import (
    MoeLayer,
    UnsupportedModelError,
    experts_routing,
    execution_device,
    correction_bias_of,
    expert_scale_of,
    dense_routing,
    input_device,
    moe_view,
    router_logits,
)
from moelens.hooks.sites import sites_of

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moelens.kernels.routing import RoutingRule


@dataclass(frozen=True)
class RouterReading:
    """How the router's tensors enter the kernel, beyond the rule itself."""

    correction_bias: bool = False  # add the layer's score-correction bias to the choice scores
    probabilities: bool = False  # the router returns softmax probabilities: the kernel routes their log
    expert_scale: bool = False  # each chosen expert's weight is multiplied by its own learned scale (Gemma 4)

    def kernel_logits(self, router_logits: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 what the kernel routes from: the router's logits, or the log of the
        probabilities it returns (softmax of log-probabilities gives the probabilities back)."""
        return router_logits.float().log() if self.probabilities else router_logits.float()

    def describe(self) -> list[str]:
        """The router tensors this reading uses, in words (for messages)."""
        return [
            words
            for on, words in (
                (self.correction_bias, "correction bias"),
                (self.probabilities, "router returns probabilities"),
                (self.expert_scale, "per-expert scale"),
            )
            if on
        ]


@dataclass(frozen=True)
class LayerRouting:
    """How one MoE layer routes, as far as the kernel reproduces it."""

    rule: RoutingRule | None  # the verified rule; None when no candidate reproduces this layer
    reading: RouterReading
    problem: str | None  # what differed (for the config's own rule), None when verified


@dataclass(frozen=True)
class RoutingCheck:
    """The outcome of checking routing rules against a model's own routing, per MoE layer.

    One rule for every layer is looked for first; only when none exists is each layer inferred on
    its own (DeepSeek-V4: hash-routed first layers, score-routed others), so a model can be
    steerable on some layers and traced only on others.
    """

    model_type: str
    layers: dict[int, LayerRouting]
    tokens: int  # tokens compared at each MoE layer
    candidates: int  # rules tried

    @property
    def steerable_layers(self) -> list[int]:
        """The MoE layers whose routing rule was verified (interventions may touch them)."""
        return [index for index, layer in self.layers.items() if layer.rule is not None]

    def steerable(self, layer_index: int) -> LayerRouting:
        """How MoE layer ``layer_index`` routes, verified; :class:`UnsupportedModelError` saying
        what differed when the kernel does not reproduce it."""
        routing = self.layers[layer_index]
        if routing.rule is None:
            elsewhere = f" Layers {self.steerable_layers} are steerable." if self.steerable_layers else ""
            raise UnsupportedModelError(
                f"{self.model_type}: moelens traces this model exactly, but cannot steer layer {layer_index}: no routing "
                f"rule reproduces its router ({self.candidates} rules inferred from its config tried on {self.tokens} "
                f"tokens).{elsewhere} {routing.problem}"
            )
        return routing

    @property
    def verified(self) -> bool:
        """Every MoE layer's routing is reproduced."""
        return all(layer.rule is not None for layer in self.layers.values())

    @property
    def rule(self) -> RoutingRule | None:
        """The rule shared by every layer (None if some layer has none, or layers differ)."""
        rules = {layer.rule for layer in self.layers.values()}
        return rules.pop() if len(rules) == 1 else None

    @property
    def reading(self) -> RouterReading:
        """The router tensors the first verified layer's rule reads (empty when none is verified)."""
        return next((layer.reading for layer in self.layers.values() if layer.rule is not None), RouterReading())

    @property
    def problem(self) -> str | None:
        """What differed at the first layer the kernel does not reproduce (None when verified)."""
        return next((layer.problem for layer in self.layers.values() if layer.problem), None)


@dataclass(frozen=True)
class _Observed:
    """What one MoE layer did on the probe tokens (host, float32)."""

    layer: MoeLayer
    logits: torch.Tensor  # [T, E] the router's logits
    index: torch.Tensor  # [T, k] the experts' top_k_index
    weights: torch.Tensor  # [T, k] the experts' top_k_weights, as float32
    weights_dtype: torch.dtype  # the dtype the experts received the weights in
    correction_bias: torch.Tensor | None  # [E]
    expert_scale: torch.Tensor | None  # [E]


_CHECKS: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], RoutingCheck]] = weakref.WeakKeyDictionary()
_PROBE_TOKENS = 32  # random hidden rows each MoE block routes in the check


def routing_check(model: nn.Module) -> RoutingCheck:
    """Infer and verify ``model``'s routing rules. Cached per model object until a router's
    parameters or buffers change in place (``load_state_dict``, training): then checked again."""
    fingerprint = _router_versions(model)
    cached = _CHECKS.get(model)
    if cached is None or cached[0] != fingerprint:
        cached = _CHECKS[model] = (fingerprint, _infer(model, _observe(model)))
    return cached[1]


def _router_versions(model: nn.Module) -> tuple[int, ...]:
    """The in-place version counters of every router's and MoE block's own tensors."""
    tensors = []
    for layer in moe_view(model).layers:
        tensors += [*layer.router.parameters(), *layer.router.buffers()]
        tensors += [*layer.block.parameters(recurse=False), *layer.block.buffers(recurse=False)]
    return tuple(t._version for t in tensors)


def check_rule(model: nn.Module, rule: RoutingRule, reading: RouterReading = RouterReading()) -> RoutingCheck:
    """Check a given ``rule`` against ``model`` (not cached): ``problem`` says what differed."""
    observed = _observe(model)
    layers = {}
    for seen in observed:
        problem = _mismatch(rule, reading, [seen])
        layers[seen.layer.index] = LayerRouting(rule if problem is None else None, reading, problem)
    return RoutingCheck(moe_view(model).model_type, layers, _tokens(observed), 1)


def scaled_by_expert(weights: torch.Tensor, indices: torch.Tensor, expert_scale: torch.Tensor | None) -> torch.Tensor:
    """[T, K] ``weights`` times each slot's expert scale (empty slots, index E, stay 0)."""
    import torch

    if expert_scale is None:
        return weights
    padded = torch.cat([expert_scale.float(), expert_scale.new_zeros(1, dtype=torch.float32)])  # [E + 1]
    return weights * padded[indices]


def _tokens(observed: list[_Observed]) -> int:
    return int(observed[0].index.shape[0])


def _observe(model: nn.Module) -> list[_Observed]:
    """Run every MoE block on seeded random hidden rows and record its router's logits and the
    routing its experts received, while the model's sites are probing: an active tracer records
    nothing of it and an active intervention does not steer it."""
    import torch

    view = moe_view(model)
    seen: dict[int, dict[str, Any]] = {layer.index: {} for layer in view.layers}
    handles = []

    def on_router(layer: MoeLayer) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[layer.index]["logits"] = router_logits(output, layer).detach()
            if layer.dense_scores:
                seen[layer.index]["routing"] = dense_routing(output, layer)
                seen[layer.index]["dense"] = output[0] if isinstance(output, tuple) else output

        return hook

    def on_experts(layer: MoeLayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[layer.index]["routing"] = experts_routing(args, kwargs)

        return hook

    hidden_size = int(view.text_config.hidden_size)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn((1, _PROBE_TOKENS, hidden_size), generator=generator)  # [1, T, H]
    try:
        for layer in view.layers:
            handles.append(layer.router.register_forward_hook(on_router(layer)))
            if not layer.dense_scores:
                handles.append(layer.experts.register_forward_pre_hook(on_experts(layer), with_kwargs=True))
        with torch.no_grad(), sites_of(model).probing():
            try:
                for layer in view.layers:
                    layer.block(rows.to(_device(layer), _dtype(layer)))
            except (RuntimeError, ValueError, TypeError, AttributeError):
                # a block that needs more than hidden states (e.g. its decoder layer holds the
                # router): one forward pass of the whole model instead, which tracers skip
                seen.update({layer.index: {} for layer in view.layers})
                _forward_probe(model)
    finally:
        for handle in handles:
            handle.remove()
    observed = []
    for layer in view.layers:
        record = seen[layer.index]
        if "logits" not in record or "routing" not in record:
            raise UnsupportedModelError(
                f"layer {layer.index}: the {'router' if 'logits' not in record else 'experts module'} did not run when "
                f"{type(layer.block).__name__} was called; its forward was probably replaced (hub kernels): load with use_kernels=False"
            )
        if record["routing"] is None:
            raise UnsupportedModelError(
                f"layer {layer.index}: {type(layer.experts).__name__} is not called with (hidden_states, top_k_index, "
                "top_k_weights), so the routing the experts use cannot be read or replaced"
            )
        index, weights = record["routing"]
        if "dense" in record and int((record["dense"] != 0).sum(dim=-1).max()) > layer.top_k:
            raise UnsupportedModelError(
                f"layer {layer.index}: the router's dense scores are non-zero on more than top-k = {layer.top_k} experts per "
                "token, so the chosen experts cannot be read from them"
            )
        bias, scale = correction_bias_of(layer), expert_scale_of(layer)
        bias = bias.detach().float().cpu() if bias is not None else None
        scale = scale.detach().float().cpu() if scale is not None else None
        observed.append(
            _Observed(layer, record["logits"].float().cpu(), index.cpu(), weights.float().cpu(), weights.dtype, bias, scale)
        )
    return observed


def _forward_probe(model: nn.Module) -> None:
    """One forward pass of ``model`` on seeded random token ids (run by :func:`_observe` while
    the model's sites are probing: unseen by tracers, unsteered)."""
    import torch

    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (1, _PROBE_TOKENS), generator=torch.Generator().manual_seed(0)).to(input_device(model))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _device(layer: MoeLayer) -> torch.device:
    """Where the block computes: the router's execution device (its offload hook's, if any), else the block's."""
    has_parameters = next(layer.router.parameters(), None) is not None
    return execution_device(layer.router if has_parameters else layer.block)


def _dtype(layer: MoeLayer) -> torch.dtype:
    """The dtype the block computes in (the router's parameters, else the block's)."""
    import torch

    for module in (layer.router, layer.block):
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            return dtype
    return torch.float32


def _infer(model: nn.Module, observed: list[_Observed]) -> RoutingCheck:
    candidates = _candidates(moe_view(model).text_config, observed)
    for count, (rule, reading) in enumerate(candidates, start=1):
        if _mismatch(rule, reading, observed) is None:  # one rule for every layer
            layers = {seen.layer.index: LayerRouting(rule, reading, None) for seen in observed}
            return RoutingCheck(moe_view(model).model_type, layers, _tokens(observed), count)
    layers = {seen.layer.index: _infer_layer(seen, candidates) for seen in observed}
    return RoutingCheck(moe_view(model).model_type, layers, _tokens(observed), len(candidates))


def _infer_layer(seen: _Observed, candidates: list[tuple[RoutingRule, RouterReading]]) -> LayerRouting:
    for rule, reading in candidates:
        if _mismatch(rule, reading, [seen]) is None:
            return LayerRouting(rule, reading, None)
    rule, reading = candidates[0]
    return LayerRouting(None, RouterReading(), f"With the config's rule ({describe_rule(rule, reading)}): {_mismatch(rule, reading, [seen])}")


def _candidates(config: Any, observed: list[_Observed]) -> list[tuple[RoutingRule, RouterReading]]:
    """Rules to try with how to read the router, the config's own reading first."""
    from moelens.kernels.routing import SCORES, RoutingRule

    values = {key: value for key, value in config.to_dict().items() if not key.startswith("_")}
    num_experts = observed[0].layer.num_experts
    # any layer's: some families' first layers route otherwise (DeepSeek-V4's hash-routed layers carry no bias)
    has_bias = any(seen.correction_bias is not None for seen in observed)
    has_scale = any(seen.expert_scale is not None for seen in observed)
    named_score = next((v for v in values.values() if v in SCORES), None)
    first_score = named_score or ("sigmoid" if has_bias else "softmax")
    scores = [first_score, *(score for score in ("softmax", "sigmoid") if score != first_score)]
    renormalize = next(
        (bool(v) for k, v in values.items() if isinstance(v, bool) and ("norm_topk" in k or "renormalize" in k)), False
    )
    scalings = [
        float(v)
        for k, v in values.items()
        if "scal" in k and any(word in k for word in ("rout", "moe", "expert")) and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    n_group = next((int(v) for k, v in values.items() if k in ("n_group", "num_expert_group", "moe_n_group") and v), 1)
    topk_group = next((int(v) for k, v in values.items() if k in ("topk_group", "moe_topk_group") and v), 1)
    groups: list[tuple[int, int, str]] = []
    if n_group > 1 and num_experts % n_group == 0 and topk_group < n_group:
        order = ["max", "top2_sum"] if first_score == "softmax" else ["top2_sum", "max"]
        groups = [(n_group, topk_group, how) for how in order]
    groups.append((1, 1, "max"))
    top_k = int(observed[0].index.shape[1])
    options = itertools.product(
        scores,
        (False, True),  # select_before_score
        (renormalize, not renormalize),
        dict.fromkeys([*scalings, 1.0]),
        groups,
        (True, False) if has_bias else (False,),
        (False, True),  # probabilities
        (True, False) if has_scale else (False,),
    )
    return [
        (
            RoutingRule(
                top_k=top_k,
                score=score,  # type: ignore[arg-type]
                select_before_score=before,
                renormalize=renorm,
                scaling=scaling,
                n_group=group[0],
                topk_group=group[1],
                group_score=group[2],  # type: ignore[arg-type]
            ),
            RouterReading(use_bias, probabilities, expert_scale),
        )
        for score, before, renorm, scaling, group, use_bias, probabilities, expert_scale in options
        if not (before and group[0] > 1)  # the kernel limits groups on scores only
        and not (probabilities and (score != "softmax" or before))  # log-probabilities give back only a softmax
    ]


def _mismatch(rule: RoutingRule, reading: RouterReading, observed: list[_Observed]) -> str | None:
    """What differs between the kernel under ``rule`` and the model's routing (None: nothing)."""
    import torch

    from moelens.kernels.routing import route

    for seen in observed:
        k = seen.index.shape[1]
        if rule.top_k != k:
            return f"top-k differs at layer {seen.layer.index}: the experts receive {k} experts per token, the rule selects {rule.top_k}"
        bias = seen.correction_bias if reading.correction_bias else None
        logits = reading.kernel_logits(seen.logits)
        if logits.shape[-1] != seen.layer.num_experts:
            return f"layer {seen.layer.index}: the router scores {logits.shape[-1]} columns for {seen.layer.num_experts} experts"
        weights, index = route(logits, rule, correction_bias=bias, impl="torch")
        weights = scaled_by_expert(weights, index, seen.expert_scale if reading.expert_scale else None)
        resolution = 1e-5 if seen.weights_dtype == torch.float32 else 1e-2
        compared = ~_tied(logits, rule, bias, k, resolution)  # [T]
        if int(compared.sum()) < compared.numel() // 2:
            return f"layer {seen.layer.index}: most probe tokens tie between their k-th and (k+1)-th expert, nothing to compare"

        model_sets, rule_sets = seen.index.sort(dim=-1).values, index.sort(dim=-1).values
        differs = (model_sets != rule_sets).any(dim=-1) & compared
        if differs.any():
            t = int(differs.nonzero()[0])
            return (
                f"experts differ at layer {seen.layer.index} on {int(differs.sum())} of {int(compared.sum())} tokens "
                f"(token {t}: the model chose {model_sets[t].tolist()}, the rule {rule_sets[t].tolist()})"
            )
        model_w = seen.weights.gather(-1, seen.index.argsort(dim=-1))
        rule_w = weights.gather(-1, index.argsort(dim=-1))
        rtol, atol = (1e-4, 1e-5) if seen.weights_dtype == torch.float32 else (2e-2, 1e-3)
        close = torch.isclose(model_w, rule_w, rtol=rtol, atol=atol).all(dim=-1) | ~compared
        if not close.all():
            t = int((~close).nonzero()[0])
            return (
                f"weights differ at layer {seen.layer.index} on {int((~close).sum())} of {int(compared.sum())} tokens "
                f"(token {t}: the model's {_rounded(model_w[t])} sum to {model_w[t].sum():.4g}, the rule's "
                f"{_rounded(rule_w[t])} to {rule_w[t].sum():.4g})"
            )
    return None


def _tied(logits: torch.Tensor, rule: RoutingRule, bias: torch.Tensor | None, k: int, resolution: float) -> torch.Tensor:
    """[T] rows whose k-th and (k+1)-th choice scores are equal within ``resolution`` (relative):
    the model's and the kernel's arithmetic may pick either expert there."""
    import torch

    from moelens.kernels.routing import choice_scores

    if k >= logits.shape[-1]:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    choice = choice_scores(logits, rule, bias)
    top = choice.topk(k + 1, dim=-1).values
    scale = top.abs().amax(dim=-1).clamp(min=1e-6)
    return (top[:, k - 1] - top[:, k]).abs() <= resolution * scale


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in values]


def describe_rule(rule: RoutingRule, reading: RouterReading) -> str:
    """The rule in words, e.g. "sigmoid, top-4, renormalised, scaled by 2.5, correction bias"."""
    parts = [f"{rule.score}", f"top-{rule.top_k}"]
    if rule.select_before_score:
        parts.append("selected on logits")
    if rule.renormalize:
        parts.append("renormalised")
    if rule.scaling != 1.0:
        parts.append(f"scaled by {rule.scaling:g}")
    if rule.n_group > 1:
        parts.append(f"{rule.topk_group} of {rule.n_group} groups by {rule.group_score}")
    return ", ".join(parts + reading.describe())
