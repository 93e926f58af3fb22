"""Export a pruned checkpoint: a ``keep`` intervention made physical (*pruning*).

The experts a ``keep`` spec leaves out are removed from the weights (router rows, score-correction bias entries and the
fused expert tensors are sliced), the config's expert count shrinks, and the kept experts are
renumbered 0..N-1 in their original order. The result is an ordinary Hugging Face checkpoint that
loads with plain transformers and computes what ``intervene(model, keep(experts))`` computes.
``moelens_prune.json`` beside the weights records the spec and, per layer, which original expert
each new index is.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from moelens.hooks.adapters import module_name, moe_layers
from moelens.interventions.apply import bind
from moelens.interventions.spec import Intervention, Keep, SpecError
from moelens.store import EXPERT_COUNT_KEYS


def _keep_sets(model: Any, spec: Intervention) -> dict[int, list[int]]:
    kept = [part for part in spec.parts if isinstance(part, Keep)]
    if len(kept) != 1 or len(spec.parts) != 1:
        raise SpecError("prune export needs a spec with exactly one `keep` part (other interventions have no checkpoint form)")
    keep = {layer: list(experts) for layer, experts in kept[0].experts.items()}
    layers = [layer.index for layer in moe_layers(model)]
    missing = sorted(set(layers) - set(keep))
    if missing:
        raise SpecError(f"prune export: MoE layers {missing} have no keep list; a config has one expert count, so list every MoE layer {layers}")
    sizes = {len(experts) for experts in keep.values()}
    if len(sizes) != 1:
        raise SpecError(f"prune export: every layer must keep the same number of experts (a config has one expert count); got sizes {sorted(sizes)}")
    return keep


def export_pruned(model: Any, tokenizer: Any, spec: Intervention, out_dir: str | os.PathLike[str]) -> Path:
    """Prune: write ``model`` with only the experts ``spec`` keeps to ``out_dir``; returns the directory.

    ``spec`` is exactly one ``keep`` part (:func:`moelens.interventions.keep`) listing every MoE layer,
    each with the same number of experts; the kept experts are renumbered 0..N-1 in their original order.
    Refused (:class:`SpecError`) where removing experts cannot keep the routing: group-limited
    rules (the groups would change) and configs without a known expert-count field.
    """
    import torch

    plans = bind(model, spec)  # ranges, dense layers, top-k and the verified rule: the intervention's checks
    keep = _keep_sets(model, spec)
    grouped = next((plan.rule for plan in plans if plan.rule.n_group > 1), None)
    if grouped is not None:
        raise SpecError(
            f"prune export: {model.config.model_type} routes within {grouped.n_group} expert groups; removing experts would "
            "regroup the rest and change routing. Use the keep intervention instead."
        )
    shared_layers = [layer.index for layer in moe_layers(model) if layer.other_experts]
    if shared_layers:
        raise SpecError(
            f"prune export: layers {shared_layers} hold a second set of experts ({moe_layers(model)[0].other_experts[0]}, ...) "
            "that a keep spec does not cover; use the keep intervention instead"
        )
    uneven = [layer.index for layer in moe_layers(model) if {p.shape[0] for p in layer.experts.parameters() if p.dim() == 3} != {layer.num_experts}]
    if uneven:
        raise SpecError(
            f"prune export: the experts of layers {uneven} are not all stored as {moe_layers(model)[0].num_experts} weight "
            "slices (e.g. LongCat's zero-computation experts have none); use the keep intervention instead"
        )
    config = copy.deepcopy(model.config)
    counts = config.get_text_config()  # the text backbone's config (the config itself for text models)
    count_fields = [name for name in EXPERT_COUNT_KEYS if isinstance(getattr(counts, name, None), int)]
    if not count_fields:
        raise SpecError(f"prune export: {config.model_type}'s config has none of {', '.join(EXPERT_COUNT_KEYS)}")
    for name in count_fields:
        setattr(counts, name, len(next(iter(keep.values()))))
    state = model.state_dict()
    for layer in moe_layers(model):
        index = torch.tensor(keep[layer.index])
        for module in (layer.router, layer.experts):
            prefix = module_name(model, module)
            for name, tensor in list(state.items()):
                if name.startswith(prefix + ".") and tensor.dim() >= 1 and tensor.shape[0] == layer.num_experts:
                    state[name] = tensor.index_select(0, index.to(tensor.device)).clone()
        bias_name = f"{layer.name}.{layer.correction_bias}"
        if layer.correction_bias is not None and state[bias_name].shape[-1] == layer.num_experts:
            # held by the block, or [1, E]: not sliced with the router's rows above
            state[bias_name] = state[bias_name].index_select(-1, index.to(state[bias_name].device)).clone()
    pruned = type(model)._from_config(config, dtype=next(model.parameters()).dtype)  # the class it was loaded as
    pruned.load_state_dict(state, strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "moelens_prune.json").write_text(
        json.dumps({"spec": spec.to_dict(), "new_to_original_expert": {str(k): v for k, v in keep.items()}}, indent=2)
    )
    return out
