"""Every exception moelens raises on purpose, under one base class.

``except moelens.MoelensError`` catches them all. Each also derives from the builtin exception its
kind of failure has always been (``ValueError`` for bad input, ``RuntimeError`` for a run that
cannot go on, ``FileNotFoundError`` for a missing model), so existing ``except ValueError``
handlers keep working. Every message says what is wrong, where, and what to do.

The defining modules re-export their own errors (``moelens.store.StoreError`` is this module's
``StoreError``).
"""

from __future__ import annotations


class MoelensError(Exception):
    """Base class of every exception moelens raises on purpose."""


class UnsupportedModelError(MoelensError, ValueError):
    """The model is not a Mixture-of-Experts model moelens can read (or steer)."""


class ModelNotFoundError(MoelensError, FileNotFoundError):
    """The name is neither a zoo model, a local checkpoint directory nor a reachable hub id."""


class TraceError(MoelensError, RuntimeError):
    """The tracer could not record what it was asked to (a router did not fire, NaN logits...)."""


class SpecError(MoelensError, ValueError):
    """An intervention spec is malformed or does not fit the model (the message says where)."""


class StoreError(MoelensError, RuntimeError):
    """A store on disk is missing, corrupt, or incompatible with what was asked of it."""


class StoreLockedError(StoreError):
    """Another live process holds the store's writer lock."""


class PromptFileError(MoelensError, ValueError):
    """The prompt file cannot be read as prompts (the message says where and why)."""


class CollectError(MoelensError, RuntimeError):
    """The collection cannot start or continue as asked (the message says what to do)."""


class EngineImportError(MoelensError, ValueError):
    """Engine outputs that cannot be imported as given (the message says where and what to do)."""


class ProfilingError(MoelensError, RuntimeError):
    """The profiling implementation could not observe what it was asked to."""
