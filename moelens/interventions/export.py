"""Export a pruned checkpoint: the ``prune`` intervention made physical.

Pruned experts are removed from the weights (router rows, score-correction bias entries and the
fused expert tensors are sliced), the config's expert count shrinks, and the kept experts are
renumbered 0..N-1 in their original order. The result is an ordinary Hugging Face checkpoint that
loads with plain transformers and computes what ``intervene(model, prune(keep))`` computes.
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
from moelens.interventions.spec import Intervention, Prune, SpecError

_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def _keep_sets(model: Any, spec: Intervention) -> dict[int, list[int]]:
    prunes = [part for part in spec.parts if isinstance(part, Prune)]
    if len(prunes) != 1 or len(spec.parts) != 1:
        raise SpecError("export needs a spec with exactly one `prune` part (other interventions have no checkpoint form)")
    keep = {layer: list(experts) for layer, experts in prunes[0].keep.items()}
    layers = [layer.index for layer in moe_layers(model)]
    missing = sorted(set(layers) - set(keep))
    if missing:
        raise SpecError(f"prune export: MoE layers {missing} have no keep list; a config has one expert count, so list every MoE layer {layers}")
    sizes = {len(experts) for experts in keep.values()}
    if len(sizes) != 1:
        raise SpecError(f"prune export: every layer must keep the same number of experts (a config has one expert count); got sizes {sorted(sizes)}")
    return keep


def export_pruned(model: Any, tokenizer: Any, spec: Intervention, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model`` with only the experts ``spec`` keeps to ``out_dir``; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    bind(model, spec)  # ranges, dense layers, top-k: the same checks as the intervention
    keep = _keep_sets(model, spec)
    config = copy.deepcopy(model.config)
    if getattr(config, "n_group", 1) not in (None, 1):
        raise SpecError(
            f"prune export: {config.model_type} routes within {config.n_group} expert groups; removing experts would "
            "regroup the rest and change routing. Use the prune intervention instead."
        )
    count_field = next(name for name in _EXPERT_COUNT_FIELDS if getattr(config, name, None))
    setattr(config, count_field, len(next(iter(keep.values()))))
    state = model.state_dict()
    for layer in moe_layers(model):
        index = torch.tensor(keep[layer.index])
        for module in (layer.router, layer.experts):
            prefix = module_name(model, module)
            for name, tensor in list(state.items()):
                if name.startswith(prefix + ".") and tensor.dim() >= 1 and tensor.shape[0] == layer.num_experts:
                    state[name] = tensor.index_select(0, index.to(tensor.device)).clone()
    pruned = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "moelens_prune.json").write_text(
        json.dumps({"spec": spec.to_dict(), "new_to_original_expert": {str(k): v for k, v in keep.items()}}, indent=2)
    )
    return out
