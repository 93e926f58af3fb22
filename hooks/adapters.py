"""Family adapters: where each MoE family keeps its routers and experts, and how it routes.

An adapter is data, not code paths: attribute names of the MoE block inside a decoder layer, and a
:class:`RoutingRule` built from the model config. Everything that observes or steers routing goes
through :func:`adapter_for` and :func:`moe_layers`, so supporting a new family means adding one
entry to ``_ADAPTERS``.

Every supported router is a module whose forward returns ``(router_logits [T, E],
weights [T, k], indices [T, k])``: the weights the experts actually use, after the family's own
normalisation and scaling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moelens.kernels.routing import RoutingRule

WeightsDtype = Literal["float32", "logits", "hidden"]


class UnsupportedModelError(ValueError):
    """The model is not a Mixture-of-Experts model moelens knows how to read."""


@dataclass(frozen=True)
class FamilyAdapter:
    """How one transformers MoE family is laid out.

    Attributes:
        family: the config's ``model_type``.
        block_attr: attribute of a decoder layer that holds the MoE block (dense layers hold an MLP there).
        router_attr: attribute of the MoE block holding the router module.
        experts_attr: attribute of the MoE block holding the fused experts (3-D weights).
        shared_attr: attribute of the MoE block holding an always-on shared expert MLP, if any.
        weights_dtype: the dtype the family's router returns its weights in.
        rule: builds the family's routing rule from the config; ``None`` when the family's routing
            is not a top-k rule the routing kernel can reproduce (interventions are then refused).
        correction_bias_attr: router buffer holding a score-correction bias used for choice only.
    """

    family: str
    block_attr: str
    router_attr: str
    experts_attr: str = "experts"
    shared_attr: str | None = None
    weights_dtype: WeightsDtype = "logits"
    rule: Callable[[Any], RoutingRule] | None = None
    correction_bias_attr: str | None = None

    def routing_rule(self, config: Any) -> RoutingRule:
        if self.rule is None:
            raise UnsupportedModelError(
                f"{self.family} routes with a rule moelens cannot re-implement (e.g. PhiMoE's sparsemixer); "
                "tracing works, interventions on this family are not available."
            )
        return self.rule(config)


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer of a loaded model: the stable observation sites moelens hooks."""

    index: int  # decoder layer index as in the module names (dense layers keep their numbers)
    name: str  # module path of the MoE block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    num_experts: int
    top_k: int


def _rule(**fixed: Any) -> Callable[[Any], RoutingRule]:
    def build(config: Any) -> RoutingRule:
        from moelens.kernels.routing import RoutingRule

        return RoutingRule(top_k=config.num_experts_per_tok, **{k: v(config) if callable(v) else v for k, v in fixed.items()})

    return build


def _norm_topk(config: Any) -> bool:
    return bool(getattr(config, "norm_topk_prob", False))


def _deepseek_v2_rule(config: Any) -> RoutingRule:
    from moelens.kernels.routing import RoutingRule

    grouped = config.topk_method == "group_limited_greedy"
    return RoutingRule(
        top_k=config.num_experts_per_tok,
        score="softmax",
        scaling=float(config.routed_scaling_factor),
        n_group=config.n_group if grouped else 1,
        topk_group=config.topk_group if grouped else 1,
        group_score="max",
    )


def _deepseek_v3_rule(config: Any) -> RoutingRule:
    from moelens.kernels.routing import RoutingRule

    return RoutingRule(
        top_k=config.num_experts_per_tok,
        score="sigmoid",
        renormalize=bool(config.norm_topk_prob),
        scaling=float(config.routed_scaling_factor),
        n_group=config.n_group,
        topk_group=config.topk_group,
        group_score="top2_sum",
    )


_ADAPTERS: dict[str, FamilyAdapter] = {
    a.family: a
    for a in (
        FamilyAdapter("mixtral", "mlp", "gate", weights_dtype="float32", rule=_rule(score="softmax", renormalize=True)),
        FamilyAdapter(
            "qwen2_moe", "mlp", "gate", shared_attr="shared_expert", rule=_rule(score="softmax", renormalize=_norm_topk)
        ),
        FamilyAdapter("qwen3_moe", "mlp", "gate", rule=_rule(score="softmax", renormalize=_norm_topk)),
        FamilyAdapter("olmoe", "mlp", "gate", rule=_rule(score="softmax", renormalize=_norm_topk)),
        FamilyAdapter("deepseek_v2", "mlp", "gate", shared_attr="shared_experts", rule=_deepseek_v2_rule),
        FamilyAdapter(
            "deepseek_v3",
            "mlp",
            "gate",
            shared_attr="shared_experts",
            rule=_deepseek_v3_rule,
            correction_bias_attr="e_score_correction_bias",
        ),
        FamilyAdapter("gpt_oss", "mlp", "router", rule=_rule(score="softmax", select_before_score=True)),
        FamilyAdapter(
            "granitemoe",
            "block_sparse_moe",
            "router",
            weights_dtype="hidden",
            rule=_rule(score="softmax", select_before_score=True),
        ),
        FamilyAdapter("phimoe", "mlp", "router"),
    )
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of ``model``'s family, or an :class:`UnsupportedModelError` that says what to do."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = _ADAPTERS.get(str(model_type))
    if adapter is None:
        suspects = _router_like_modules(model)
        hint = (
            f" Modules that look like routers: {', '.join(suspects[:5])}{' ...' if len(suspects) > 5 else ''}."
            if suspects
            else " No module looks like an MoE router, so it is probably a dense model."
        )
        raise UnsupportedModelError(
            f"moelens does not support model_type {model_type!r}. Supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}.{hint} A new family needs one FamilyAdapter entry in "
            "moelens.hooks.adapters."
        )
    return adapter


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """The MoE layers of ``model`` in layer order; raises if the family is unsupported or has none."""
    adapter = adapter_for(model)
    layers = _decoder_layers(model)
    config = _text_config(model)
    found: list[MoeLayer] = []
    for index, layer in enumerate(layers):
        block = getattr(layer, adapter.block_attr, None)
        router = getattr(block, adapter.router_attr, None)
        experts = getattr(block, adapter.experts_attr, None)
        if router is None or experts is None:
            continue  # a dense layer
        found.append(
            MoeLayer(
                index=index,
                name=module_name(model, block),
                block=block,
                router=router,
                experts=experts,
                shared=getattr(block, adapter.shared_attr, None) if adapter.shared_attr else None,
                num_experts=_num_experts(router, experts, config),
                top_k=int(getattr(router, "top_k", None) or config.num_experts_per_tok),
            )
        )
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({adapter.family}) has no MoE layers: every decoder layer's "
            f"`{adapter.block_attr}` is a dense MLP (check mlp_only_layers / first_k_dense_replace / "
            "decoder_sparse_step in its config)."
        )
    return found


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return getattr(config, "text_config", None) or config


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from torch import nn

    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return list(module)
    raise UnsupportedModelError(f"{type(model).__name__} has no `layers` ModuleList of decoder layers.")


def input_device(model: nn.Module) -> torch.device:
    """Where ``model`` wants its input ids: the device its token embeddings compute on (the
    execution device of an offloaded embedding, whose weights sit on ``meta`` between calls)."""
    import torch

    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embeddings.weight.device


def materialized(module: nn.Module, name: str) -> torch.Tensor:
    """The values of ``module``'s parameter or buffer ``name``, also when accelerate has offloaded
    it (the module then holds a ``meta`` tensor between calls and its hook keeps the values)."""
    value = getattr(module, name)
    if value.device.type != "meta":
        return value
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is None or name not in weights_map:
        raise UnsupportedModelError(
            f"{type(module).__name__}.{name} is on the meta device and no offload hook holds its values: "
            "load the model with its weights (device_map with cpu/disk offload is fine; init_empty_weights is not)"
        )
    return weights_map[name]


def module_name(model: nn.Module, target: nn.Module) -> str:
    """The dotted path of ``target`` inside ``model`` (e.g. ``model.layers.3.mlp.gate``)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise LookupError("module is not part of the model")


def _num_experts(router: nn.Module, experts: nn.Module, config: Any) -> int:
    for source in (router, experts):
        value = getattr(source, "num_experts", None)
        if value:
            return int(value)
    return int(getattr(config, "n_routed_experts", None) or config.num_local_experts)


def _router_like_modules(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if "router" in cls or "topk" in cls or name.endswith(("router", ".gate")):
            names.append(f"{name} ({type(module).__name__})")
    return names


def router_weights_dtype(adapter: FamilyAdapter, logits: torch.Tensor, hidden: torch.Tensor) -> torch.dtype:
    """The dtype the family's router returns its routing weights in."""
    import torch

    return {"float32": torch.float32, "logits": logits.dtype, "hidden": hidden.dtype}[adapter.weights_dtype]
