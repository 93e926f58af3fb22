"""moelens: look inside Mixture-of-Experts language models and steer them.

``import moelens`` is cheap: torch, transformers and the rest load when a function needs them.

Public entry points::

    model, tokenizer = moelens.load("moelens-tiny")          # or "tiny:<family>", or a checkpoint dir
    with moelens.trace(model, tokenizer=tokenizer) as tr:     # record routing decisions
        model.generate(**batch, max_new_tokens=16)
    tr.routes                                                  # one row per (prompt, position, layer, rank)
    tr = moelens.trace(model, prompts=texts, tags={"domain": domains}, tokenizer=tokenizer)  # runs them now
    store = moelens.scan_trace("runs/trace")                   # a store written by `moelens collect` (lazy)
    # both are a moelens.Trace: .routes/.tokens/.prompts, .sql(), .to_pandas(); every analysis takes either
    with moelens.intervene(model, disable({2: [5]})): ...      # specs: moelens.interventions
    moelens.generate_contrast(model, tokenizer, prompts)       # SCMoE self-contrast decoding
"""

from __future__ import annotations

from moelens._lazy import lazy_attributes
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first attribute access (PEP 562)
_LAZY = {
    "load": "moelens.loading",
    "trace": "moelens.tracer",
    "Tracer": "moelens.tracer",
    "TraceError": "moelens.tracer",
    "Trace": "moelens.store",
    "scan_trace": "moelens.store",
    "read_trace": "moelens.store",
    "StoreError": "moelens.store",
    "intervene": "moelens.interventions",
    "generate_contrast": "moelens.interventions.contrast",
    "MoelensError": "moelens.errors",
    "UnsupportedModelError": "moelens.errors",
    "SpecError": "moelens.errors",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:
    from moelens.errors import MoelensError, SpecError, UnsupportedModelError
    from moelens.interventions import intervene
    from moelens.interventions.contrast import generate_contrast
    from moelens.loading import load
    from moelens.store import StoreError, Trace, read_trace, scan_trace
    from moelens.tracer import TraceError, Tracer, trace


__getattr__, __dir__ = lazy_attributes('moelens', globals(), _LAZY)
