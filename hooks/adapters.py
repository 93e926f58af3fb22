"""The model view: where a model keeps its MoE layers, found from the module tree, not from a table.

transformers 5.x MoE families share conventions, and this module reads those instead of a list of
family names, so a family added by a later transformers release that follows them is covered
without a code change:

* **experts**: a module whose class went through transformers' ``use_experts_implementation``
  (recognised by the attributes that decorator sets), whose forward takes ``top_k_index``, or,
  failing that, an ``...Experts`` module holding 3-D fused weights ``[E, ...]``. Its forward
  receives ``(hidden_states, top_k_index, top_k_weights)``: what the routing decided, after
  everything the family's block did to it. Where the experts take no routing (Llama 4), the
  router returns a dense ``[T, E]`` score matrix that the block applies to the experts' inputs
  (:attr:`MoeLayer.dense_scores`), and the routing is read there.
* **MoE block**: the experts' parent module.
* **router**: the block's child whose parameters include an ``[E, hidden]`` matrix (the scoring
  weights), preferring a child named ``router`` or ``gate``.
* **correction bias / expert scale**: a tensor of E values named ``*bias*`` / ``*scale*`` held by
  the router (any depth) or by the block (which passes it to the router).
* **shared expert**: a block child whose name starts with ``shared`` and holds parameters other
  than a one-output gate.
* **decoder layer**: the index, in the text decoder stack's ``layers`` list, of the layer holding
  the block. Multimodal models: only the text stack; hybrid stacks: only layers with experts.

Everything that needs the model's structure asks :func:`moe_view` (built once per model and
cached), so the model is discovered once. How a layer *routes* (its :class:`RoutingRule`) is not
read from names either: :mod:`moelens.hooks.routing_check` infers it from the config and verifies
it against the model's own routing.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from moelens.errors import UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


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
    correction_bias: str | None = None  # path from the block of a tensor [E] added to the scores for choice only (DeepSeek-V3 kin)
    # the experts take no routing arguments: the router returns a dense [T, E] score matrix (zero
    # off the chosen experts) that the block applies to the experts' inputs (Llama 4); the routing
    # is read from, and replaced in, the router's output
    dense_scores: bool = False
    expert_scale: str | None = None  # path from the block of a router tensor [E] scaling each chosen expert's weight (Gemma 4)
    # further experts modules in the same decoder layer, not traced (ERNIE-VL's vision experts,
    # which only image tokens reach)
    other_experts: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class MoeView:
    """A model's MoE structure, discovered once (:func:`moe_view`). It holds no reference to the
    model object itself (the cache is keyed weakly on it), only to its submodules."""

    model_type: str
    _stack: weakref.ref[nn.Module]  # weak: for a base model passed directly, the stack is the model itself
    decoder_layers: nn.ModuleList  # every decoder layer, dense ones included
    layers: tuple[MoeLayer, ...]
    text_config: Any

    @property
    def stack(self) -> nn.Module:
        """The text decoder stack: owns the decoder layers, one forward per step."""
        return alive(self._stack)

    @property
    def num_decoder_layers(self) -> int:
        """Decoder layers of the text stack, dense ones included."""
        return len(self.decoder_layers)


def alive(ref: weakref.ref[nn.Module]) -> nn.Module:
    """The module behind a weak reference moelens keeps to a user's model (it never keeps one alive)."""
    module = ref()
    if module is None:
        raise ReferenceError("the model moelens was given no longer exists")
    return module


_VIEWS: weakref.WeakKeyDictionary[Any, MoeView] = weakref.WeakKeyDictionary()

# config attributes that hold a family's top-k, in the order they are trusted
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_top_k")


def moe_view(model: nn.Module) -> MoeView:
    """The MoE structure of ``model`` (cached per model object; raises :class:`UnsupportedModelError`)."""
    view = _VIEWS.get(model)
    if view is None:
        view = _VIEWS[model] = _discover(model)
    return view


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """The MoE layers of ``model`` in layer order; raises if it has none moelens can read."""
    return list(moe_view(model).layers)


def text_config(model: nn.Module) -> Any:
    """The config of ``model``'s text backbone (``config.text_config`` on multimodal models)."""
    config = model.config
    sub = getattr(config, "get_text_config", None)
    return sub() if callable(sub) else getattr(config, "text_config", None) or config


def _discover(model: nn.Module) -> MoeView:
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    try:
        stack, decoder_layers = _text_stack(model)
    except UnsupportedModelError:
        stack, decoder_layers = None, []
    config = text_config(model)
    found: list[MoeLayer] = []
    skipped: list[str] = []
    for index, decoder_layer in enumerate(decoder_layers):
        experts_modules = [m for m in decoder_layer.modules() if _is_experts(m)]
        if not experts_modules:
            continue  # a dense (or attention-only) layer
        layer, why = _moe_layer(model, index, experts_modules[0], config)
        if layer is not None and len(experts_modules) > 1:
            layer = replace(layer, other_experts=tuple(module_name(model, m) for m in experts_modules[1:]))
        if layer is None:
            skipped.append(f"layer {index}: {why}")
        else:
            found.append(layer)
    if skipped:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type}) has experts whose router moelens cannot locate: {'; '.join(skipped)}. "
            "Report the model type; an override in moelens.hooks.adapters can name the router."
        )
    if not found:
        suspects = _router_like_modules(model)
        hint = (
            f" Modules that look like routers: {', '.join(suspects[:5])}{' ...' if len(suspects) > 5 else ''}, but no "
            "experts module with fused [E, ...] weights sits beside them (experts kept as separate modules or as table rows are not read)."
            if suspects
            else " No module looks like an MoE router, so it is probably a dense model"
            " (or every layer is configured dense: check mlp_only_layers / first_k_dense_replace / decoder_sparse_step)."
        )
        raise UnsupportedModelError(f"{type(model).__name__} ({model_type}) has no MoE layers moelens can read.{hint}")
    assert stack is not None
    return MoeView(model_type, weakref.ref(stack), decoder_layers, tuple(found), config)


def _text_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The text decoder stack and its list of decoder layers: the first ``ModuleList`` (under the
    model's decoder, so not a vision or audio tower) whose layers hold experts, whatever its name
    (``layers``, DBRX's ``blocks`` ...)."""
    from torch import nn

    get_decoder = getattr(model, "get_decoder", None)
    roots = []
    if callable(get_decoder):
        try:
            roots.append(get_decoder())
        except (AttributeError, NotImplementedError, ValueError):
            pass
    roots.append(model)
    for root in roots:
        for owner in root.modules():
            for child in owner.children():
                if isinstance(child, nn.ModuleList) and any(_is_experts(m) for m in child.modules()):
                    return owner, child
    raise UnsupportedModelError(
        f"{type(model).__name__} has no list of decoder layers holding fused experts (a module whose class went through "
        "transformers' use_experts_implementation, or an `...Experts` module with 3-D [E, ...] weights)"
    )


def _is_experts(module: nn.Module) -> bool:
    """Fused experts: a class decorated with ``use_experts_implementation`` (it sets these
    attributes at init), a forward taking ``top_k_index``, or 3-D weights under the conventional name."""
    if hasattr(module, "_is_expert_parallel") and hasattr(module, "is_concatenated"):
        return True
    if "top_k_index" in inspect.signature(type(module).forward).parameters:
        return True  # the experts interface's calling convention without the decorator (DBRX)
    return type(module).__name__.endswith("Experts") and any(p.dim() == 3 for p in module.parameters(recurse=False))


def _moe_layer(model: nn.Module, index: int, experts: nn.Module, config: Any) -> tuple[MoeLayer | None, str]:
    block_name = module_name(model, experts).rsplit(".", 1)[0]
    block = model.get_submodule(block_name)
    num_experts = _num_experts(experts)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    router = _router(block, experts, num_experts, hidden)
    if router is None:
        return None, f"no child of {block_name} ({type(block).__name__}) holds a [{num_experts}, {hidden}] scoring matrix"
    shared = next(
        (child for name, child in block.named_children() if name.startswith("shared") and _is_mlp(child, hidden)), None
    )
    top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None)
    if not isinstance(top_k, int):
        top_k = next((int(getattr(config, key)) for key in _TOP_K_KEYS if isinstance(getattr(config, key, None), int)), None)
    if not top_k:
        return None, f"its top-k is neither a `top_k` attribute of {type(router).__name__} nor a config key ({', '.join(_TOP_K_KEYS)})"
    return (
        MoeLayer(
            index=index,
            name=block_name,
            block=block,
            router=router,
            experts=experts,
            shared=shared,
            num_experts=num_experts,
            top_k=int(top_k),
            correction_bias=_per_expert(block, router, num_experts, "bias"),
            expert_scale=_per_expert(block, router, num_experts, "scale"),
            dense_scores=not _takes_routing(experts),
        ),
        "",
    )


def _takes_routing(experts: nn.Module) -> bool:
    """Whether the experts' forward takes (hidden_states, top_k_index, top_k_weights) or a superset."""
    parameters = [p for p in inspect.signature(type(experts).forward).parameters.values() if p.name != "self"]
    return any(p.kind == p.VAR_POSITIONAL for p in parameters) or len(parameters) >= 3


def _num_experts(experts: nn.Module) -> int:
    value = getattr(experts, "num_experts", None)
    if isinstance(value, int) and value > 0:
        return value
    fused = [p for p in experts.parameters() if p.dim() == 3]
    if not fused:
        raise UnsupportedModelError(f"{type(experts).__name__} has neither `num_experts` nor 3-D [E, ...] weights")
    return int(fused[0].shape[0])


def _scores_experts(module: nn.Module, num_experts: int, hidden: int) -> bool:
    """Whether ``module`` (recursively) holds an [E, hidden] or [hidden, E] scoring matrix."""
    shapes = {(num_experts, hidden), (hidden, num_experts)}
    return any(tuple(p.shape) in shapes for p in module.parameters())


def _router(block: nn.Module, experts: nn.Module, num_experts: int, hidden: int) -> nn.Module | None:
    """The child scoring the experts: the one holding an [E, hidden] matrix (named ``router`` /
    ``gate`` if several do), else a child so named (an MLP router, a router with extra outputs)."""
    children = [(name, child) for name, child in block.named_children() if child is not experts and not name.startswith("shared")]
    scoring = [(name, child) for name, child in children if _scores_experts(child, num_experts, hidden)]
    named = [child for name, child in (scoring or children) if name in ("router", "gate")]
    if named:
        return named[0]
    return scoring[0][1] if len(scoring) == 1 else None


def _is_mlp(module: nn.Module, hidden: int) -> bool:
    """A shared expert computes in the hidden space: some weight has ``hidden`` on one side and more than one output."""
    return any(p.dim() == 2 and hidden in p.shape and min(p.shape) > 1 for p in module.parameters())


def _router_tensors(block: nn.Module, router: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(path from the block, tensor) of every router tensor (any depth) and of the block's own."""
    router_path = next(name for name, child in block.named_children() if child is router)
    owned = [(f"{router_path}.{name}", t) for name, t in [*router.named_buffers(), *router.named_parameters()]]
    return owned + [*block.named_buffers(recurse=False), *block.named_parameters(recurse=False)]


def _per_expert(block: nn.Module, router: nn.Module, num_experts: int, word: str) -> str | None:
    """Path of a tensor of E values whose name contains ``word``, in the router or on the block.
    A linear layer's own ``bias`` is excluded: it is already in the logits."""
    for path, tensor in _router_tensors(block, router):
        leaf = path.rsplit(".", 1)[-1]
        if leaf != "bias" and word in leaf and tensor.numel() == num_experts and tensor.shape[-1] == num_experts:
            return path
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where ``model`` wants its input ids: the device its token embeddings compute on (the
    execution device of an offloaded embedding, whose weights sit on ``meta`` between calls)."""
    return execution_device(model.get_input_embeddings())


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its offload hook's execution device, else its parameters' device."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    device = next((p.device for p in module.parameters()), None)
    if device is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no parameters to tell where it computes")
    return device


def materialized(module: nn.Module, path: str) -> torch.Tensor:
    """The values of the parameter or buffer at ``path`` (dotted, from ``module``), also when
    accelerate has offloaded it (the owner then holds a ``meta`` tensor between calls and its hook
    keeps the values)."""
    owner_path, _, name = path.rpartition(".")
    module = module.get_submodule(owner_path) if owner_path else module
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


def _router_like_modules(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        leaf = name.rsplit(".", 1)[-1]
        if "router" in cls or "topk" in cls or "gating" in cls or "router" in leaf or leaf == "gate":
            names.append(f"{name} ({type(module).__name__})")
    return names


def router_logits(output: Any, layer: MoeLayer) -> torch.Tensor:
    """[T, E] the router logits in a router's output: the output itself, or the first [.., E]
    float tensor of the tuple it returns (``(logits, weights, indices)`` by transformers' convention;
    for dense-score routers, ``(scores, logits)``, the one after the scores)."""
    import torch

    num_experts = layer.num_experts
    values = [v for v in (output if isinstance(output, tuple) else (output,)) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if layer.dense_scores and len(values) > 1:
        values = values[1:]
    for value in values:
        if value.shape[-1] == num_experts:
            return value.reshape(-1, num_experts)
    for value in values:  # routers that also score a null expert (more columns than experts)
        if value.dim() >= 2 and value.shape[-1] > num_experts:
            return value.reshape(-1, value.shape[-1])
    raise UnsupportedModelError(f"the router returned no [tokens, {num_experts}] logits tensor (got {type(output).__name__})")


def experts_routing(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(top_k_index [T, k], top_k_weights [T, k]) from an experts module's forward arguments,
    ``None`` when the experts are not called with routing (they receive pre-weighted inputs)."""
    index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
    weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
    if index is None or weights is None or index.is_floating_point() or index.dim() != 2:
        return None
    return index, weights


def with_experts_routing(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: torch.Tensor, weights: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The experts' forward arguments with the routing replaced (where the caller put it)."""
    args, kwargs = list(args), dict(kwargs)
    for position, name, value in ((1, "top_k_index", index), (2, "top_k_weights", weights)):
        if name in kwargs:
            kwargs[name] = value
        else:
            args[position] = value
    return tuple(args), kwargs


# An *empty slot* (a token given fewer experts than its k slots: top-p, rank, a layer's top_k, or
# every eligible expert disabled) is written one way and read back one way, both here:
# fill_empty_slots writes it for the experts, filled_slots finds it in what they received.
def fill_empty_slots(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] routing with its empty slots (the kernel's sentinel index E) pointed at the token's
    first expert with weight 0.

    transformers' experts implementations skip the sentinel index E only under expert parallelism
    (grouped_mm with biases indexes out of bounds otherwise); a repeated expert with weight 0
    adds exactly nothing, and :func:`filled_slots` leaves such repeats out.
    """
    import torch

    empty = indices >= num_experts
    return torch.where(empty, 0.0, weights), torch.where(empty, indices[:, :1], indices)


def null_class_as_empty(logits: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, num_experts: int, empty: int) -> torch.Tensor:
    """[T, k] ``index`` with the slots a null class took marked ``empty``. A router that scores
    more classes than there are experts (Zaya's skip expert: logits [T, E + 1]) hands its experts a
    slot the null class won as some expert with weight 0, since they have no null expert; that slot
    routed to nothing. Other routers' indices are returned as they are."""
    import torch

    if logits.shape[-1] <= num_experts:
        return index
    return torch.where(weights == 0, empty, index)


def filled_slots(indices: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., k] bool: False on empty slots, i.e. the sentinel index E or a zero-weight repeat of an
    expert already in an earlier slot (what :func:`fill_empty_slots` writes)."""
    import numpy as np

    num_slots = indices.shape[-1]
    repeat = np.zeros(indices.shape, dtype=bool)
    for slot in range(1, num_slots):
        repeat[..., slot] = (indices[..., :slot] == indices[..., slot : slot + 1]).any(axis=-1)
    return ~(repeat & (weights == 0)) & (indices < num_experts)


def correction_bias_of(layer: MoeLayer) -> torch.Tensor | None:
    """[E] the layer's score-correction bias (``None`` if it has none), offloaded values included."""
    return None if layer.correction_bias is None else materialized(layer.block, layer.correction_bias).reshape(-1)


def expert_scale_of(layer: MoeLayer) -> torch.Tensor | None:
    """[E] the layer's per-expert weight scale (``None`` if it has none), offloaded values included."""
    return None if layer.expert_scale is None else materialized(layer.block, layer.expert_scale).reshape(-1)


def dense_routing(output: Any, layer: MoeLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index [T, k], top_k_weights [T, k]) of a dense-score router's output: its k largest
    scores (the chosen experts; every other score is zero, which the routing check verifies)."""
    import torch

    scores = output[0] if isinstance(output, tuple) else output
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.shape[-1] != layer.num_experts:
        raise UnsupportedModelError(
            f"layer {layer.index}: {type(layer.experts).__name__} takes no routing arguments and the router's first output "
            f"is not a [tokens, {layer.num_experts}] score matrix, so moelens cannot read which experts were chosen"
        )
    weights, index = scores.reshape(-1, layer.num_experts).topk(layer.top_k, dim=-1)
    # fewer than k non-zero scores (an intervention emptied slots): the rest are empty slots, not experts
    return torch.where(weights != 0, index, layer.num_experts), weights


def with_dense_routing(output: Any, index: torch.Tensor, weights: torch.Tensor) -> Any:
    """A dense-score router's output with the scores replaced by ``weights`` at ``index`` (zero
    elsewhere; added, so an empty slot's zero-weight repeat of an expert changes nothing)."""
    scores = output[0] if isinstance(output, tuple) else output
    dense = scores.new_zeros(scores.reshape(-1, scores.shape[-1]).shape).scatter_add_(1, index, weights.to(scores.dtype))
    dense = dense.reshape(scores.shape)
    return (dense, *output[1:]) if isinstance(output, tuple) else dense
