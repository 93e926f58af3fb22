"""EASY-EP expert importance (after "Domain-Specific Pruning of Large MoE Models with Few-shot Demonstrations").

For MoE layer l and routed expert e, over the real tokens t of a domain's demonstrations:

    S(l, e) = sum_t  g(t, e) * ||E_e(h_t)||_2 * max(0, 1 - cos(x_t, x_t + routed_t))

* ``g(t, e)``: the routing weight the model multiplies expert e's output with (0 if not chosen);
* ``E_e(h_t)``: the expert's raw output (down_proj, before the routing weight) on the block input h_t;
* ``x_t``: the residual stream entering the MoE sublayer, i.e. the input of the decoder layer's
  ``post_attention_layernorm`` (not the normalised block input h_t: the MoE output is added to the
  residual stream, and the cosine measures how far that addition turns it);
* ``routed_t``: the weighted sum of the routed experts' outputs, shared experts excluded.

Experts are observed through the moelens experts implementation (bitwise eager outputs), so the
same families are supported (see :mod:`moelens.analysis._profiling_experts`). Granite scales the
MoE output by ``residual_multiplier`` before adding it; the cosine here uses the unscaled output.
The authors calibrate on the 25 longest demonstrations per domain; choose the texts accordingly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from moelens.analysis._profiling_experts import TokenBatch, profiling_experts, token_batches
from moelens.hooks.adapters import MoeLayer, input_device, moe_layers

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from moelens.interventions.spec import Intervention

RESIDUAL_NORM = "post_attention_layernorm"  # the decoder-layer norm whose input is the residual stream x_t


def expert_importance(
    model: nn.Module,
    tokenizer: Any,
    texts_by_domain: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> pd.DataFrame:
    """EASY-EP scores of every routed expert for each domain's demonstrations (no gradients).

    Returns a DataFrame with one row per (domain, layer, expert): ``domain``, ``layer``, ``expert``,
    ``score`` (S(l, e) above) and ``normalised`` (score / sum of the layer's scores in that domain,
    so every layer of every domain sums to 1, or 0 where no expert scored).
    """
    import pandas as pd

    layers = moe_layers(model)
    parts = []
    for domain, texts in texts_by_domain.items():
        scores = _domain_scores(model, tokenizer, list(texts), layers, batch_size=batch_size, max_length=max_length)
        for layer, score in zip(layers, scores, strict=True):
            values = score.cpu().double().numpy()
            total = values.sum()
            parts.append(pd.DataFrame({
                "domain": domain, "layer": layer.index, "expert": range(layer.num_experts), "score": values,
                "normalised": values / total if total > 0 else 0.0,
            }))
    if not parts:
        raise ValueError("texts_by_domain is empty")
    return pd.concat(parts, ignore_index=True)


def combined_importance(table: pd.DataFrame, n: int | None = None) -> pd.DataFrame:
    """Each layer's experts ranked by their importance with the domains combined: an
    :func:`expert_importance` table's ``normalised`` summed over domains per (layer, expert).

    Returns columns ``layer``, ``expert``, ``combined`` (that sum: in [0, number of domains]) and
    ``place`` (the expert's place within its layer, 1 = most important; ties go to the lower expert
    id), sorted by layer then place; with ``n`` (>= 1) only places <= ``n``, i.e. ``n`` experts per layer.
    """
    from moelens.analysis._specs import check_count

    check_count(n, optional=True)
    combined = table.groupby(["layer", "expert"], as_index=False)["normalised"].sum()
    combined = combined.rename(columns={"normalised": "combined"})
    ranked = combined.sort_values(["layer", "combined", "expert"], ascending=[True, False, True], kind="stable")
    ranked["place"] = ranked.groupby("layer").cumcount() + 1
    if n is not None:
        ranked = ranked[ranked["place"] <= n]
    return ranked.reset_index(drop=True)


def top_experts(table: pd.DataFrame, n: int) -> dict[int, list[int]]:
    """The ``n`` most important experts of every layer (``n`` per layer, not overall: EASY-EP's scores
    are normalised within a layer and it keeps the same number in each), domains combined as in
    :func:`combined_importance`, as {layer: sorted experts}; ``n`` >= 1."""
    from moelens.analysis._specs import by_layer, check_count

    check_count(n)
    return by_layer(combined_importance(table, n))


def to_spec(table: pd.DataFrame, n: int, *, kind: str = "keep", **options: Any) -> Intervention:
    """An intervention on :func:`top_experts` ``(table, n)``: the ``n`` most important experts of
    every layer (per layer, not overall).

    Kinds:
        ``"keep"`` (default, EASY-EP's; the only one): routing in every layer is restricted to those
            experts (``keep(experts)``); ``export_pruned`` of the spec writes the pruned checkpoint.

    ``options`` go to the constructor (``keep`` takes none).
    """
    from moelens.analysis._specs import build
    from moelens.interventions import keep

    return build(kind, {"keep": keep}, top_experts(table, n), **options)


def _domain_scores(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    layers: list[MoeLayer],
    *,
    batch_size: int,
    max_length: int | None,
) -> list[torch.Tensor]:
    """S(l, e) of every MoE layer (in ``layers`` order) over ``texts``: [E] float64 tensors."""
    import torch

    device = input_device(model)
    observers = {l.index: _Importance(l.num_experts, device) for l in layers}
    with ExitStack() as stack:
        for l in layers:
            norm = getattr(model.get_submodule(l.name.rsplit(".", 1)[0]), RESIDUAL_NORM, None)
            if norm is None:
                raise NotImplementedError(
                    f"layer {l.index} has no `{RESIDUAL_NORM}`: moelens cannot read its residual stream"
                )
            stack.callback(norm.register_forward_pre_hook(observers[l.index].residual_hook).remove)
        stack.enter_context(torch.no_grad())
        stack.enter_context(profiling_experts(model, {l.experts: observers[l.index] for l in layers}))
        for batch in token_batches(tokenizer, texts, batch_size=batch_size, device=device, max_length=max_length):
            for observer in observers.values():
                observer.batch = batch
            model(**batch.inputs, use_cache=False)
    return [observers[l.index].score for l in layers]


class _Importance:
    """Accumulates S(l, e) for one MoE layer; one batch at a time."""

    def __init__(self, num_experts: int, device: Any) -> None:
        import torch

        self.batch: TokenBatch | None = None
        self.score = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.residual: torch.Tensor | None = None  # [T, H] x_t of the current forward
        self.contribution: torch.Tensor | None = None  # [T, E] g * ||E_e(h_t)|| of the current forward

    def residual_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.residual = x.detach().reshape(-1, x.shape[-1]).float()  # [B, S, H] -> [T, H], the experts' row order

    def expert_output(self, expert: int, tokens: torch.Tensor, output: torch.Tensor, weights: torch.Tensor) -> None:
        import torch

        if self.contribution is None:
            self.contribution = torch.zeros(len(self.batch.valid), len(self.score), device=output.device)
        self.contribution[tokens, expert] = weights.detach().float() * output.detach().float().norm(dim=-1)

    def routed_output(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        import torch.nn.functional as F

        if self.contribution is None:  # no token was routed to a local expert
            return
        real = self.batch.valid  # indexing, not masking by product: padding rows may hold NaN
        x, routed = self.residual[real], output.detach().float()[real]  # [T_real, H]
        # 1 - cos is a small difference of numbers near 1: in float32 it keeps only a few digits
        turn = (1 - F.cosine_similarity(x.double(), (x + routed).double(), dim=-1)).clamp(min=0)  # [T_real]
        self.score += (self.contribution[real].double() * turn[:, None]).sum(dim=0)
        self.residual = self.contribution = None
