"""moelens inside nnsight: capture routes and steer routers within ``.trace()`` / ``.generate()``.

Call these *inside* an nnsight block on an ``nnsight`` model wrapper (``LanguageModel`` /
``TransformersModel``) holding a supported MoE model. They use only nnsight's own operations:
reading a router envoy's ``.output`` and replacing its experts envoy's ``.inputs``, with plain torch ops in between
(the routing function of ``moelens.kernels``), so the same code can run where nnsight runs it::

    with lm.trace(prompt):
        moelens.nnsight_ops.steer(lm, disable({3: [5]}))
        routes = moelens.nnsight_ops.capture_routes(lm)   # {layer: (weights, indices)}, saved
        logits = lm.output.logits.save()

    with lm.generate(prompt, max_new_tokens=8) as tracer:
        for _ in tracer.iter[0:8]:                         # the prefill and every decode step
            moelens.nnsight_ops.steer(lm, reweight({3: [5]}, 4.0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moelens.interventions.spec import Intervention, SpecError

if TYPE_CHECKING:
    import torch


def _unwrapped(wrapper: Any) -> Any:
    model = getattr(wrapper, "_module", None)
    if model is None:
        raise TypeError(f"expected an nnsight model wrapper (LanguageModel / TransformersModel), got {type(wrapper).__name__}")
    return model


def _envoy(wrapper: Any, module_path: str) -> Any:
    """The nnsight envoy of the module at ``module_path`` (e.g. ``model.layers.3.mlp.gate``)."""
    envoy = wrapper
    for part in module_path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def capture_routes(wrapper: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Inside a trace: ``{layer: (weights [T, k], indices [T, k])}`` as the experts received them, saved."""
    import nnsight

    from moelens.hooks.adapters import dense_routing, experts_routing, module_name, moe_layers

    model = _unwrapped(wrapper)
    routes = nnsight.save({})  # saved: nnsight hands it back to the caller's frame after the block
    for layer in moe_layers(model):
        if layer.dense_scores:
            index, weights = dense_routing(_envoy(wrapper, module_name(model, layer.router)).output, layer)
        else:
            args, kwargs = _envoy(wrapper, module_name(model, layer.experts)).inputs
            index, weights = experts_routing(args, kwargs)
        routes[layer.index] = (weights, index)
    return routes


def steer(wrapper: Any, spec: Intervention) -> None:
    """Inside a trace: re-route every affected MoE layer under ``spec`` (all tokens): the router's
    logits go through the routing kernel and replace the routing its experts receive.

    Token-scoped parts (``tokens="prompt"`` ...) are refused: within nnsight, scope with its own
    step selection (``tracer.iter[...]``) instead.
    """
    from moelens.hooks.adapters import experts_routing, module_name, router_logits, with_dense_routing, with_experts_routing
    from moelens.interventions.apply import bind, reroute

    scoped = [part.kind for part in spec.parts if part.tokens != "all"]
    if scoped:
        raise SpecError(f"nnsight_ops.steer applies to all tokens; {scoped} parts have a token scope (use tracer.iter[...] to pick steps)")
    model = _unwrapped(wrapper)
    for plan in bind(model, spec):
        layer = plan.layer
        router = _envoy(wrapper, module_name(model, layer.router))
        output = router.output
        logits = router_logits(output, layer)
        new_weights, new_indices = reroute(plan, logits, None)  # all tokens: no step bookkeeping needed
        if layer.dense_scores:  # Llama 4: the router's dense score matrix is what the experts get
            router.output = with_dense_routing(output, new_indices, new_weights)
            continue
        experts = _envoy(wrapper, module_name(model, layer.experts))
        args, kwargs = experts.inputs
        weights = experts_routing(args, kwargs)[1]
        experts.inputs = with_experts_routing(args, kwargs, new_indices, new_weights.to(weights.dtype))
