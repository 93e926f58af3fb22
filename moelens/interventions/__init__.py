"""Interventions: change which experts fire, at inference, on any model whose routing rule is verified
(``moelens families`` lists them; the others are refused with what differed).

Build a spec with the constructors, combine with ``+``, apply with :func:`intervene`::

    spec = disable({3: [5, 9]}) + reweight({5: [1]}, factor=8.0, tokens="generated")
    spec += disable({4: [2]}, mode=Drop(renormalize=True))   # modes: Reroute() (default) or Drop(...)
    spec += rank(1, layers=[6])                               # ranks count from 0: 1 = the second choice

Words: *drop* (still chosen, output zeroed), *reroute* (the slot goes to the next choice), *keep* (routing
restricted to a kept set), *prune* (experts physically removed from a checkpoint: ``export_pruned``).
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
    keep,
    logit_bias,
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
    "keep",
    "logit_bias",
    "rank",
    "reweight",
    "top_k",
    "top_p",
]
