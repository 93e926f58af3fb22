"""moelens inside nnsight: capture routes and steer routers within ``.trace()`` / ``.generate()``.

Call these *inside* an nnsight block on an ``nnsight`` model wrapper (``LanguageModel`` /
``TransformersModel``) holding a supported MoE model. They use only nnsight's own operations:
reading a router envoy's ``.output`` and assigning a new one, with plain torch ops in between
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
    """Inside a trace: ``{layer: (weights [T, k], indices [T, k])}`` as the routers returned them, saved."""
    import nnsight

    from moelens.hooks.adapters import module_name, moe_layers

    model = _unwrapped(wrapper)
    routes = nnsight.save({})  # saved: nnsight hands it back to the caller's frame after the block
    for layer in moe_layers(model):
        output = _envoy(wrapper, module_name(model, layer.router)).output
        routes[layer.index] = (output[1], output[2])
    return routes


def steer(wrapper: Any, spec: Intervention) -> None:
    """Inside a trace: re-route every affected router's output under ``spec`` (all tokens).

    Token-scoped parts (``tokens="prompt"`` ...) are refused: within nnsight, scope with its own
    step selection (``tracer.iter[...]``) instead.
    """
    from moelens.hooks.adapters import module_name
    from moelens.interventions.apply import bind, fill_empty_slots
    from moelens.kernels.routing import route

    scoped = [part.kind for part in spec.parts if part.tokens != "all"]
    if scoped:
        raise SpecError(f"nnsight_ops.steer applies to all tokens; {scoped} parts have a token scope (use tracer.iter[...] to pick steps)")
    model = _unwrapped(wrapper)
    for plan in bind(model, spec):
        envoy = _envoy(wrapper, module_name(model, plan.layer.router))
        logits, weights = envoy.output[0], envoy.output[1]
        correction_bias, (variant,) = plan.on(logits.device)
        routed = route(logits.float(), plan.rule, correction_bias=correction_bias, controls=variant.controls)
        new_weights, new_indices = fill_empty_slots(*routed, plan.layer.num_experts)
        envoy.output = (logits, new_weights.to(weights.dtype), new_indices)
