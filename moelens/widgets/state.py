"""The steering grid's state: which experts of which layers are disabled, forced or boosted.

Pure Python (no ipywidgets, no torch at import): the notebook view in :mod:`moelens.widgets.view`
only forwards clicks here and re-renders. The state turns into an ordinary intervention spec
(:meth:`ExpertGridState.to_spec`) and back (:meth:`ExpertGridState.from_spec`); whether a spec fits
a model is decided by the project's own binding (:func:`moelens.interventions.apply.bind`), so the
grid reports exactly the errors ``intervene`` would raise, before anything is generated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from moelens.hooks.adapters import input_device
from moelens.interventions.spec import Disable, Force, Intervention, Reweight, SpecError, disable, force, reweight

if TYPE_CHECKING:
    from torch import nn

    from moelens.tracer import Tracer

Mode = Literal["on", "disabled", "forced", "boosted"]
MODES: tuple[Mode, ...] = ("on", "disabled", "forced", "boosted")  # also the cycling order of toggle()
SCOPES = ("all", "prompt", "generated")
DISABLE_MODES = ("reroute", "drop")


@dataclass(frozen=True)
class GridLayer:
    """One MoE layer as the grid sees it."""

    index: int
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class Options:
    """Settings shared by every cell: how disabling works, the boost factor, which tokens are steered."""

    disable_mode: Literal["reroute", "drop"] = "reroute"
    boost_factor: float = 4.0
    scope: Literal["all", "prompt", "generated"] = "all"


@dataclass(frozen=True)
class _Snapshot:
    modes: dict[tuple[int, int], Mode]
    options: Options


@dataclass(frozen=True)
class PromptComparison:
    """One prompt generated greedily without and with the grid's intervention.

    ``routing_changed`` is the fraction of routing events (token x MoE layer, matched on position)
    whose expert set differs between the two runs; once the texts diverge, generated positions
    compare different tokens, which counts as a change too.
    """

    prompt: str
    baseline: str
    steered: str
    routing_changed: float
    routing_events: int
    baseline_trace: Tracer = field(repr=False)
    steered_trace: Tracer = field(repr=False)


class ExpertGridState:
    """Per (layer, expert) a mode among :data:`MODES` (default ``"on"``) plus shared :class:`Options`.

    Every change (``set``, ``toggle``, ``mark``, ``clear``, ``configure``, ``apply_spec``) can be
    reverted with :meth:`undo`; a change that changes nothing is not recorded.
    """

    def __init__(self, layers: Sequence[GridLayer], options: Options = Options()) -> None:
        if not layers:
            raise ValueError("the grid needs at least one MoE layer")
        self.layers: dict[int, GridLayer] = {layer.index: layer for layer in layers}
        self._modes: dict[tuple[int, int], Mode] = {}  # only cells that are not "on"
        self._options = _checked(options)
        self._history: list[_Snapshot] = []

    @classmethod
    def from_model(cls, model: nn.Module, options: Options = Options()) -> ExpertGridState:
        """An all-``"on"`` grid over ``model``'s MoE layers."""
        from moelens.hooks.adapters import moe_layers

        return cls([GridLayer(layer.index, layer.num_experts, layer.top_k) for layer in moe_layers(model)], options)

    @classmethod
    def from_spec(cls, spec: Intervention, layers: Sequence[GridLayer] | nn.Module) -> ExpertGridState:
        """A grid showing ``spec`` (see :meth:`apply_spec`) over ``layers`` or a model's MoE layers."""
        state = cls(layers) if isinstance(layers, Sequence) else cls.from_model(layers)
        state.apply_spec(spec)
        state._history.clear()  # a fresh grid has nothing to undo
        return state

    # --- reading --------------------------------------------------------------------------------
    @property
    def options(self) -> Options:
        return self._options

    def mode(self, layer: int, expert: int) -> Mode:
        self._check_cell(layer, expert)
        return self._modes.get((layer, expert), "on")

    def experts(self, mode: Mode) -> dict[int, list[int]]:
        """{layer: sorted experts} of the cells in ``mode`` (not for ``"on"``, which is every other cell)."""
        chosen: dict[int, list[int]] = {}
        for (layer, expert), cell_mode in sorted(self._modes.items()):
            if cell_mode == mode:
                chosen.setdefault(layer, []).append(expert)
        return chosen

    def to_spec(self) -> Intervention:
        """The grid as one spec: ``disable(...) + force(...) + reweight(...)`` (empty parts left out)."""
        options = self._options
        spec = Intervention()
        if disabled := self.experts("disabled"):
            spec += disable(disabled, mode=options.disable_mode, tokens=options.scope)
        if forced := self.experts("forced"):
            spec += force(forced, tokens=options.scope)
        if boosted := self.experts("boosted"):
            spec += reweight(boosted, options.boost_factor, tokens=options.scope)
        return spec

    def validate(self, model: nn.Module) -> None:
        """Raise :class:`SpecError` with the project's message if the grid's spec does not fit ``model``
        (e.g. more forced experts than top-k slots in a layer, every expert of a layer disabled)."""
        from moelens.interventions.apply import bind

        bind(model, self.to_spec())

    def problem(self, model: nn.Module) -> str | None:
        """The validation message, or ``None`` if the grid can be applied to ``model``."""
        try:
            self.validate(model)
        except SpecError as error:
            return str(error)
        return None

    def summary(self) -> str:
        """One line, e.g. ``disabled L1: 5, 9 | boosted x4 L3: 0 | scope all, reroute``."""
        if not self._modes:
            return "baseline routing (no expert changed)"
        options = self._options
        labels = {"disabled": f"disabled ({options.disable_mode})", "forced": "forced", "boosted": f"boosted x{options.boost_factor:g}"}
        parts = []
        for mode, label in labels.items():
            if chosen := self.experts(mode):
                cells = "; ".join(f"L{layer}: {', '.join(map(str, experts))}" for layer, experts in chosen.items())
                parts.append(f"{label} {cells}")
        return " | ".join([*parts, f"tokens: {options.scope}"])

    # --- changing -------------------------------------------------------------------------------
    def set(self, layer: int, expert: int, mode: Mode) -> None:
        """Put one cell in ``mode``."""
        self.mark({layer: [expert]}, mode)

    def toggle(self, layer: int, expert: int, mode: Mode | None = None) -> Mode:
        """Without ``mode``: advance the cell along :data:`MODES` (cyclically). With ``mode``: set it,
        or switch it back ``"on"`` if it already is in ``mode`` (a paint brush). Returns the new mode."""
        current = self.mode(layer, expert)
        if mode is None:
            new = MODES[(MODES.index(current) + 1) % len(MODES)]
        else:
            new = "on" if current == mode else _checked_mode(mode)
        self.set(layer, expert, new)
        return new

    def mark(self, experts: Mapping[int, Iterable[int]], mode: Mode) -> None:
        """Put many cells in ``mode`` at once (one undo step), e.g. the top fTRI experts of a domain."""
        _checked_mode(mode)
        cells = [(int(layer), int(expert)) for layer, ids in experts.items() for expert in ids]
        for cell in cells:
            self._check_cell(*cell)
        modes = dict(self._modes)
        for cell in cells:
            if mode == "on":
                modes.pop(cell, None)
            else:
                modes[cell] = mode
        self._change(modes, self._options)

    def clear(self) -> None:
        """Every cell back to ``"on"`` (the options stay)."""
        self._change({}, self._options)

    def configure(self, **options: Any) -> None:
        """Change shared options: ``disable_mode`` ("reroute"/"drop"), ``boost_factor`` (> 0), ``scope``."""
        try:
            new = dataclasses.replace(self._options, **options)
        except TypeError:
            names = ", ".join(f.name for f in dataclasses.fields(Options))
            raise ValueError(f"unknown option in {sorted(options)}; options are {names}") from None
        self._change(self._modes, _checked(new))

    def apply_spec(self, spec: Intervention) -> None:
        """Add a spec's disable/force/reweight parts to the grid (one undo step); its disable mode,
        boost factor and token scope become the options.

        Raises ``ValueError`` for what a grid cannot show: other kinds (top-p, rank, ...),
        renormalisation, explicit token positions, or two values of one option.
        """
        modes = dict(self._modes)
        found: dict[str, set[Any]] = {"disable_mode": set(), "boost_factor": set(), "scope": set()}
        kinds: dict[type, Mode] = {Disable: "disabled", Force: "forced", Reweight: "boosted"}
        for part in spec.parts:
            mode = kinds.get(type(part))
            if mode is None:
                raise ValueError(f"the grid shows disable, force and reweight only; this spec has a {part.kind!r} part")
            if getattr(part, "renormalize", False):
                raise ValueError(f"the grid does not show renormalised {part.kind}; apply that spec with intervene() directly")
            if part.tokens not in SCOPES:
                raise ValueError(f"the grid steers {', '.join(SCOPES)} tokens; this {part.kind} applies to positions {part.tokens}")
            found["scope"].add(part.tokens)
            if isinstance(part, Disable):
                found["disable_mode"].add(part.mode)
            if isinstance(part, Reweight):
                found["boost_factor"].add(part.factor)
            for layer, experts in part.experts.items():
                for expert in experts:
                    self._check_cell(layer, expert)
                    modes[(layer, expert)] = mode
        conflicting = {name: sorted(values) for name, values in found.items() if len(values) > 1}
        if conflicting:
            raise ValueError(f"the grid holds one value per option; this spec has {conflicting}")
        options = dataclasses.replace(self._options, **{name: values.pop() for name, values in found.items() if values})
        self._change(modes, _checked(options))

    def undo(self) -> bool:
        """Revert the last change; ``False`` if there is nothing to undo."""
        if not self._history:
            return False
        snapshot = self._history.pop()
        self._modes, self._options = snapshot.modes, snapshot.options
        return True

    def _change(self, modes: dict[tuple[int, int], Mode], options: Options) -> None:
        if modes == self._modes and options == self._options:
            return
        self._history.append(_Snapshot(self._modes, self._options))
        self._modes, self._options = dict(modes), options

    def _check_cell(self, layer: int, expert: int) -> None:
        grid_layer = self.layers.get(layer)
        if grid_layer is None:
            raise ValueError(f"layer {layer} is not an MoE layer of this grid; MoE layers are {sorted(self.layers)}")
        if not 0 <= expert < grid_layer.num_experts:
            raise ValueError(f"expert {expert} is out of range in layer {layer}: experts are 0-{grid_layer.num_experts - 1}")

    # --- running --------------------------------------------------------------------------------
    def compare(self, model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16) -> list[PromptComparison]:
        """Generate each prompt greedily without and with :meth:`to_spec`, tracing both runs.

        Validates first (raises :class:`SpecError` before generating anything). Prompts run one
        at a time, so no padding enters either run.
        """
        import torch

        import moelens
        from moelens.analysis import routing_stability

        self.validate(model)
        spec = self.to_spec()
        device = input_device(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def generate(batch: Mapping[str, torch.Tensor]) -> tuple[str, Tracer]:
            with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as tracer:
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new_tokens = output[0, batch["input_ids"].shape[1] :]
            return tokenizer.decode(new_tokens, skip_special_tokens=True), tracer

        results = []
        for prompt in prompts:
            batch = tokenizer([prompt], return_tensors="pt").to(device)
            baseline, baseline_trace = generate(batch)
            with moelens.intervene(model, spec):
                steered, steered_trace = generate(batch)
            stability = routing_stability(baseline_trace, steered_trace)
            events = int(stability["tokens"].sum())
            changed = float(stability["changed"].sum()) / events if events else 0.0
            results.append(PromptComparison(prompt, baseline, steered, changed, events, baseline_trace, steered_trace))
        return results


def _checked_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def _checked(options: Options) -> Options:
    """Reject option values no spec could carry (the constructors raise SpecError, a ValueError)."""
    if options.scope not in SCOPES:
        raise ValueError(f"scope {options.scope!r}: use one of {', '.join(SCOPES)}")
    disable({}, mode=options.disable_mode)
    reweight({}, options.boost_factor)
    return options
