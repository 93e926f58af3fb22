"""Which MoE families of the installed transformers moelens traces and steers (``moelens families``).

For every model type whose modeling code defines routed experts (:func:`moelens.zoo.shrink.moe_model_types`),
a tiny random causal LM is built from its config class (:func:`moelens.zoo.shrink.build_tiny_model`)
and put through what a user does first:

* **traced**: the model view finds its MoE layers, and a traced forward pass over a left-padded
  batch records, for every real token and every MoE layer, exactly the top-k experts the experts
  module received (the tracer reads them there, so this holds whatever the router returns);
* **steerable**: a routing rule inferred from the config reproduces the model's own routing
  (:mod:`moelens.hooks.routing_check`), and disabling the first MoE layer's busiest expert removes
  it from that layer's routes and changes the logits.

Every failure carries its reason, so a family left out says why. The test suite checks the same
families against independent hooks (``tests/test_families.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moelens.hooks.adapters import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FamilyReport:
    """What moelens can do with one model type of the installed transformers."""

    model_type: str
    built: bool  # a tiny random model could be built and run in plain transformers
    traced: bool
    steerable: bool
    rule: str | None  # the verified routing rule, described
    reason: str | None  # why the family is not built / traced / steerable


def family_reports(model_types: Iterable[str] | None = None) -> list[FamilyReport]:
    """One :class:`FamilyReport` per model type (default: every MoE model type of transformers)."""
    from moelens.zoo.shrink import moe_model_types

    return [family_report(model_type) for model_type in (moe_model_types() if model_types is None else model_types)]


def family_report(model_type: str) -> FamilyReport:
    """Build a tiny random ``model_type`` model and check it: a padded traced forward pass, the
    routing-rule check, and disabling its busiest expert (removed from routing, logits changed)."""
    import torch

    from moelens.zoo.shrink import build_tiny_model

    try:
        model = build_tiny_model(model_type)
    except Exception as error:  # noqa: BLE001 - any build failure is the family's reason, reported
        return FamilyReport(model_type, False, False, False, None, f"tiny model does not build: {_short(error)}")
    with torch.no_grad():
        try:
            routes = _traced_routes(model)
        except Exception as error:  # noqa: BLE001
            return FamilyReport(model_type, True, False, False, None, f"not traced: {_short(error)}")
        try:
            rule = _steer(model, routes)
        except Exception as error:  # noqa: BLE001
            return FamilyReport(model_type, True, True, False, None, _short(error))
    return FamilyReport(model_type, True, True, True, rule, None)


def _batch(model: nn.Module) -> dict[str, Any]:
    """Two rows of random ids, the second left-padded by 3 tokens."""
    import torch

    from moelens.hooks.adapters import input_device

    generator = torch.Generator().manual_seed(1)
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(3, min(vocab, 250), (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    device = input_device(model)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _traced_routes(model: nn.Module) -> Any:
    import moelens
    from moelens.hooks.adapters import moe_layers

    batch = _batch(model)
    with moelens.trace(model) as tracer:
        model(**batch)
    routes = tracer.routes
    layers = moe_layers(model)
    real_tokens = int(batch["attention_mask"].sum())
    per_token = routes.groupby(["layer", "prompt_id", "position"]).size()
    if len(per_token) != real_tokens * len(layers):
        raise AssertionError(f"{len(per_token)} (token, layer) pairs recorded, expected {real_tokens} x {len(layers)}")
    if int(per_token.max()) > max(layer.top_k for layer in layers):
        raise AssertionError("more experts recorded per token than the family's top-k")
    return routes


def _steer(model: nn.Module, routes: Any) -> str:
    import torch

    import moelens
    from moelens.hooks.adapters import moe_layers
    from moelens.hooks.routing_check import describe_rule, routing_check
    from moelens.interventions import disable, intervene

    check = routing_check(model)
    if not check.verified:
        partly = f"only layers {check.steerable_layers} are steerable; " if check.steerable_layers else ""
        raise UnsupportedModelError(f"{partly}no routing rule reproduces every router. {check.problem}")
    layer = moe_layers(model)[0].index
    busiest = int(routes.query("layer == @layer")["expert"].value_counts().index[0])
    batch = _batch(model)
    plain = model(**batch).logits
    with intervene(model, disable({layer: [busiest]})), moelens.trace(model) as tracer:
        steered = model(**batch).logits
    if busiest in set(tracer.routes.query("layer == @layer")["expert"]):
        raise AssertionError(f"disabled expert {busiest} still routed at layer {layer}")
    if torch.equal(plain, steered):
        raise AssertionError("disabling the busiest expert left the logits unchanged")
    if check.rule is None:
        return "; ".join(f"layer {index}: {describe_rule(layer.rule, layer.reading)}" for index, layer in check.layers.items() if layer.rule)
    return describe_rule(check.rule, check.reading)


def format_reports(reports: list[FamilyReport]) -> str:
    """A Markdown table of ``reports`` and the coverage among the families that build."""
    lines = ["| family | built | traced | steerable | routing rule / reason |", "|---|---|---|---|---|"]
    mark = {True: "yes", False: "no"}
    for r in reports:
        lines.append(f"| {r.model_type} | {mark[r.built]} | {mark[r.traced]} | {mark[r.steerable]} | {r.rule or r.reason} |")
    built = [r for r in reports if r.built]
    if built:
        traced = sum(r.traced for r in built)
        steered = sum(r.steerable for r in built)
        lines.append(
            f"\n{len(reports)} MoE model types, {len(built)} build a tiny model; of those, {traced} traced "
            f"({100 * traced / len(built):.0f}%) and {steered} steerable ({100 * steered / len(built):.0f}%)."
        )
    return "\n".join(lines)


def _short(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return first_line if isinstance(error, UnsupportedModelError) else f"{type(error).__name__}: {first_line}"
