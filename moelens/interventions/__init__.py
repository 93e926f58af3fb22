"""Interventions: change which experts fire, at inference, on any model whose routing rule is verified
(``moelens families`` lists them; the others are refused with what differed).

Build a spec with the constructors, combine with ``+``, apply with :func:`intervene`::

    spec = disable({3: [5, 9]}) + reweight({5: [1]}, factor=8.0, tokens="generated")
    spec += disable({4: [2]}, mode=Drop(renormalize=True))   # modes: Reroute() (default) or Drop(...)
    with intervene(model, spec):
        model.generate(...)
"""

from moelens.interventions.apply import active_intervention, intervene
from moelens.interventions.spec import (
    Drop,
    Intervention,
    Reroute,
    SpecError,
    disable,
    force,
    logit_bias,
    prune,
    rank,
    reweight,
    top_k,
    top_p,
)

__all__ = [
    "Drop",
    "Intervention",
    "Reroute",
    "SpecError",
    "active_intervention",
    "disable",
    "force",
    "intervene",
    "logit_bias",
    "prune",
    "rank",
    "reweight",
    "top_k",
    "top_p",
]
