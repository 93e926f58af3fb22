"""The observation sites: the one owner of moelens' hooks on a model's decoder stack, routers and experts.

Every MoE layer has two sites, found by :func:`moelens.hooks.adapters.moe_view`: its *router* (whose
output carries the logits) and its *experts* module (whose forward receives ``top_k_index`` and
``top_k_weights``, the routing the model uses). The decoder stack is a third site: one forward call
of it is a *step*, whose token bookkeeping (:class:`~moelens.hooks.steps.StepTokens`) is read once
here and shared.

Two kinds of clients attach to a model's :class:`RoutingSites` (:func:`sites_of`, one per decoder
stack, so a causal-LM wrapper and its base model share them):

* **observers** (:class:`RoutingObserver`, any number: tracers) are told when a step begins, the
  routing every MoE layer used in it, and when it ends;
* one **rewriter** (:class:`Rewriter`: the intervention session, which folds every nested
  ``intervene`` block into one) replaces the routing of the layers it steers.

The order is fixed here, so that observers record what the experts really received: the rewrite
runs first (its hooks are prepended to the module's), observers are told after it (their hook
is appended). Where the experts take no routing (Llama 4's dense scores), the same order holds on
the router's output. Hooks exist only while a client is attached, on the layers that need them,
and are removed when the last one leaves: a model with nothing attached carries no moelens hook.

During :meth:`RoutingSites.probing` (moelens' own forward pass, e.g. the routing check), nothing
is reported and nothing is rewritten in that thread: clients see only the user's forward calls.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from moelens.errors import UnsupportedModelError
from moelens.hooks.adapters import (
    MoeLayer,
    dense_routing,
    experts_routing,
    moe_view,
    router_logits,
    with_dense_routing,
    with_experts_routing,
)
from moelens.hooks.steps import StepTokens

if TYPE_CHECKING:
    import torch
    from torch import nn


class RoutingObserver:
    """What an observer is told; each method does nothing unless overridden."""

    def begin_step(self, tokens: StepTokens) -> None:
        """A forward call of the decoder stack begins with these tokens."""

    def routed(self, layer: MoeLayer, logits: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """``layer``'s router returned ``logits`` [T, E'] (E' >= E: some routers score a null
        expert), and its experts received ``index`` / ``weights`` [T, k] (after any rewrite).
        Also called for layers run outside a step (a block called directly)."""

    def end_step(self, completed: bool) -> None:
        """The forward call of the decoder stack ended; ``completed`` is False when it raised (the
        step is partial, and the error is on its way to the caller)."""


class Rewriter(Protocol):
    """Replaces the routing of some MoE layers (the intervention session)."""

    @property
    def layers(self) -> frozenset[int]:
        """The MoE layer indices whose routing it replaces."""
        ...

    @property
    def needs_steps(self) -> bool:
        """Whether :meth:`reroute` needs the step's tokens (token- or row-scoped interventions)."""
        ...

    def reroute(self, layer: MoeLayer, logits: torch.Tensor, tokens: StepTokens | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, indices) [T, K] for the router's ``logits`` [T, E']; ``tokens`` is the
        current step's: ``None`` outside a forward call of the decoder stack (a block called
        directly, or a layer recomputed in backward under activation checkpointing), or when
        :attr:`needs_steps` is False."""
        ...


class _ThreadState(threading.local):
    """What one thread's forward call is doing: hooks run in the thread that calls the model, and
    a notebook may run a widget's generate in a worker thread while the kernel runs its own."""

    def __init__(self) -> None:
        self.probing = 0  # depth of probing() blocks in this thread
        self.tokens: StepTokens | None = None  # the current step's, while the stack's forward runs
        self.logits: dict[int, torch.Tensor] = {}  # layer -> the router's last logits, until its experts run
        self.generation = 0  # the sites' generation these belong to (see RoutingSites._state)


class RoutingSites:
    """The hooks moelens holds on one model (see the module docstring); get it with :func:`sites_of`.

    Attaching or detaching a client adds or removes only the hooks that change, under a lock: a
    forward call running meanwhile (in another thread) keeps its hooks and its step.
    """

    def __init__(self, model: nn.Module) -> None:
        self._view = moe_view(model)  # submodules only, never the model object: the sites do not keep it alive
        self._observers: tuple[RoutingObserver, ...] = ()  # replaced, never mutated: hooks iterate a snapshot
        self._rewriter: Rewriter | None = None
        self._handles: dict[tuple[str, int], Any] = {}  # (hook kind, MoE layer index or -1 for the stack) -> handle
        self._generation = 0  # + 1 each time the last client leaves
        self._lock = threading.RLock()
        self._thread = _ThreadState()

    @contextmanager
    def observing(self, observer: RoutingObserver) -> Iterator[None]:
        """Tell ``observer`` about every step while the block runs."""
        with self._lock:
            if any(o is observer for o in self._observers):
                raise ValueError("this observer is already attached to the model")
            self._observers = (*self._observers, observer)
            try:
                self._reinstall()
            except BaseException:
                self._observers = tuple(o for o in self._observers if o is not observer)
                self._reinstall()
                raise
        try:
            yield
        finally:
            with self._lock:
                self._observers = tuple(o for o in self._observers if o is not observer)
                self._reinstall()

    def rewrite(self, rewriter: Rewriter | None) -> None:
        """Make ``rewriter`` the model's one rewriter (``None``: rewrite nothing)."""
        with self._lock:
            self._rewriter = rewriter
            self._reinstall()

    @contextmanager
    def probing(self) -> Iterator[None]:
        """A forward pass of moelens' own, in this thread: no step or routing is reported and
        nothing is rewritten (other threads' forward calls are unaffected)."""
        state = self._thread
        state.probing += 1
        try:
            yield
        finally:
            state.probing -= 1

    # --- installation ----------------------------------------------------------------------
    def _reinstall(self) -> None:
        """Make the installed hooks exactly those the clients need (called under the lock)."""
        wanted = self._wanted()
        for key in [key for key in self._handles if key not in wanted]:
            self._handles.pop(key).remove()
        try:
            for key, register in wanted.items():
                if key not in self._handles:
                    self._handles[key] = register()
        except BaseException:
            for handle in self._handles.values():
                handle.remove()
            self._handles = {}
            raise
        if not self._handles:  # nothing attached: what any thread holds of a step is from an earlier attachment
            self._generation += 1

    def _state(self) -> _ThreadState:
        """This thread's step state, emptied if it is from before the last client left (a forward
        interrupted then, e.g. by KeyboardInterrupt, which always-call hooks do not see)."""
        state = self._thread
        if state.generation != self._generation:
            state.tokens, state.logits, state.generation = None, {}, self._generation
        return state

    def _wanted(self) -> dict[tuple[str, int], Callable[[], Any]]:
        """The hooks the current clients need, by key, each with how to register it. Rewrites are
        prepended (they run before any other hook of the module), observers appended."""
        rewriter, observers = self._rewriter, bool(self._observers)
        rewritten = rewriter.layers if rewriter is not None else frozenset()
        if not observers and not rewritten:
            return {}
        view = self._view
        stack = view.stack
        wanted: dict[tuple[str, int], Callable[[], Any]] = {}
        if observers or (rewriter is not None and rewriter.needs_steps):
            wanted[("begin step", -1)] = lambda: stack.register_forward_pre_hook(self._begin_step, with_kwargs=True)
            wanted[("end step", -1)] = lambda: stack.register_forward_hook(self._end_step, always_call=True)
        for layer in view.layers:
            steered, i = layer.index in rewritten, layer.index
            router, experts = layer.router, layer.experts
            if layer.dense_scores:  # the routing is in the router's output
                if steered:
                    wanted[("rescore", i)] = lambda r=router, h=self._rescore_hook(layer): r.register_forward_hook(h, prepend=True)
                if observers:
                    wanted[("observe dense", i)] = lambda r=router, h=self._dense_observer(layer): r.register_forward_hook(h)
                continue
            if steered or observers:
                wanted[("keep logits", i)] = lambda r=router, h=self._logits_keeper(layer): r.register_forward_hook(h)
            if steered:
                wanted[("reroute", i)] = lambda e=experts, h=self._reroute_hook(layer): e.register_forward_pre_hook(h, with_kwargs=True, prepend=True)
            if observers:
                wanted[("observe experts", i)] = lambda e=experts, h=self._experts_observer(layer): e.register_forward_pre_hook(h, with_kwargs=True)
        return wanted

    # --- the stack: one step per forward call ------------------------------------------------
    def _begin_step(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        thread = self._state()
        if thread.probing:
            return
        thread.tokens = StepTokens.from_call(args, kwargs)
        for observer in self._observers:
            observer.begin_step(thread.tokens)

    def _end_step(self, module: nn.Module, args: Any, output: Any) -> None:
        thread = self._state()
        if thread.probing or thread.tokens is None:
            return
        thread.tokens = None
        for observer in self._observers:
            observer.end_step(completed=output is not None)  # torch passes None when the forward raised

    # --- routers and experts ----------------------------------------------------------------
    def _report(self, layer: MoeLayer, logits: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        for observer in self._observers:
            observer.routed(layer, logits, index, weights)

    def _logits_keeper(self, layer: MoeLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._state().logits[layer.index] = router_logits(output, layer)

        return hook

    def _routing(
        self, layer: MoeLayer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, consume: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(the router's logits, top_k_index, top_k_weights) at an experts module's call, or
        ``None`` when the router's logits were not seen since its experts last ran: the layer is
        then neither observed nor rewritten in this call. The last hook to read the logits
        ``consume``s them, so a stale read cannot happen. Two causes, both reported elsewhere: a
        client attached (from another thread) between this layer's router and its experts, or a
        block whose forward skips the router; a tracer then finds the layer missing from its step
        (:class:`~moelens.errors.TraceError`), and the routing check refuses to bind interventions
        on such a block."""
        routing = experts_routing(args, kwargs)
        if routing is None:
            raise UnsupportedModelError(
                f"layer {layer.index}: {type(module).__name__} was called without (top_k_index, top_k_weights); "
                "moelens reads (and replaces) the routing from those arguments"
            )
        thread = self._state()
        logits = thread.logits.pop(layer.index, None) if consume else thread.logits.get(layer.index)
        return None if logits is None else (logits, *routing)

    def _reroute_hook(self, layer: MoeLayer) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            rewriter, thread = self._rewriter, self._state()
            if thread.probing or rewriter is None:
                return None
            routing = self._routing(layer, module, args, kwargs, consume=not self._observers)
            if routing is None:
                return None
            logits, _, weights = routing
            new_weights, new_index = rewriter.reroute(layer, logits, thread.tokens)
            return with_experts_routing(args, kwargs, new_index, new_weights.to(weights.dtype))

        return hook

    def _experts_observer(self, layer: MoeLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            thread = self._state()
            if thread.probing:
                thread.logits.pop(layer.index, None)
                return
            routing = self._routing(layer, module, args, kwargs, consume=True)
            if routing is not None:
                self._report(layer, *routing)

        return hook

    def _rescore_hook(self, layer: MoeLayer) -> Callable[..., Any]:
        """Dense-score routers (Llama 4): replace the score matrix the block applies to the experts."""

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            rewriter, thread = self._rewriter, self._state()
            if thread.probing or rewriter is None:
                return None
            weights, index = rewriter.reroute(layer, router_logits(output, layer), thread.tokens)
            return with_dense_routing(output, index, weights)

        return hook

    def _dense_observer(self, layer: MoeLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._state().probing:
                self._report(layer, router_logits(output, layer), *dense_routing(output, layer))

        return hook


# keyed by the decoder stack, not the model object: a causal-LM wrapper and its base model share it
_SITES: weakref.WeakKeyDictionary[Any, RoutingSites] = weakref.WeakKeyDictionary()


def sites_of(model: nn.Module) -> RoutingSites:
    """The observation sites of ``model``'s decoder stack (one per stack, created on first use;
    ``model`` and ``model.model`` get the same)."""
    stack = moe_view(model).stack
    sites = _SITES.get(stack)
    if sites is None:
        sites = _SITES[stack] = RoutingSites(model)
    return sites
