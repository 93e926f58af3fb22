"""The steering grid's state: which experts of which layers are disabled, forced or boosted.

Pure Python (no ipywidgets, no torch at import): the notebook view in :mod:`moelens.widgets.view`
only forwards clicks here and redraws when the state tells its observers that it changed, so a
change made from a notebook cell shows as well as a click. The state turns into an ordinary
intervention spec (:meth:`ExpertGridState.to_spec`) and back (:meth:`ExpertGridState.from_spec`);
whether a spec fits a model is decided by the project's own binding
(:func:`moelens.interventions.apply.bind`), so the grid reports exactly the errors ``intervene``
would raise, before anything is generated. Besides the modes the state holds a selection (the
cells an expert card or a heatmap click points at) and optional cell scores that shade the grid
into a heatmap (:class:`CellScores`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from moelens.hooks.adapters import input_device
from moelens.widgets._observable import Observable
from moelens.widgets.tokens import PieceDecoder
from moelens.interventions.spec import Disable, Force, Intervention, Reweight, SpecError, disable, force, reweight

if TYPE_CHECKING:
    import pandas as pd
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
class ReferenceScore:
    """The log-probability of a reference continuation after a prompt, under one run's routing.

    ``logprob`` is the sum over the continuation's tokens of ln p(token | prompt, earlier tokens),
    in nats; ``tokens`` is how many continuation tokens were scored.
    """

    logprob: float
    tokens: int

    @property
    def mean(self) -> float:
        """Nats per continuation token."""
        return self.logprob / self.tokens


@dataclass(frozen=True)
class PromptComparison:
    """One prompt generated greedily without and with the grid's intervention.

    ``baseline_pieces`` / ``steered_pieces`` are the generated tokens as text pieces (decoded so
    that their concatenation is the decoded continuation: no tokenizer markers, whitespace kept).
    ``routing_changed`` is the fraction of routing events (token x MoE layer, matched on position)
    whose expert set differs between the two runs; once the texts diverge, generated positions
    compare different tokens, which counts as a change too. With a reference continuation,
    ``baseline_reference`` / ``steered_reference`` are its log-probabilities under each run.
    """

    prompt: str
    baseline_pieces: tuple[str, ...]
    steered_pieces: tuple[str, ...]
    routing_changed: float
    routing_events: int
    baseline_trace: Tracer = field(repr=False)
    steered_trace: Tracer = field(repr=False)
    reference: str | None = None
    baseline_reference: ReferenceScore | None = None
    steered_reference: ReferenceScore | None = None

    @property
    def baseline(self) -> str:
        """The baseline continuation's text."""
        return "".join(self.baseline_pieces)

    @property
    def steered(self) -> str:
        """The steered continuation's text."""
        return "".join(self.steered_pieces)


@dataclass(frozen=True)
class GenerationProgress:
    """Reported while :meth:`ExpertGridState.compare` runs: ``pieces`` generated so far by ``run``
    (``"baseline"`` or ``"steered"``) for prompt ``prompt_index`` (0-based) of ``prompts``."""

    prompt_index: int
    prompts: int
    run: Literal["baseline", "steered"]
    pieces: tuple[str, ...]


# the colours at the ends of the shading scales (the other end is white)
NEGATIVE_END, POSITIVE_END, SEQUENTIAL_END = (33, 102, 172), (178, 24, 43), (8, 48, 107)


@dataclass(frozen=True)
class CellScores:
    """A score per (layer, expert) that shades the grid, e.g. an fTRI difference, a load share or
    an nPMI value. ``signed`` scores get a diverging scale centred on 0, the others a sequential one."""

    name: str
    values: Mapping[tuple[int, int], float]
    signed: bool

    @classmethod
    def from_table(cls, table: pd.DataFrame, value: str, *, name: str | None = None, signed: bool | None = None) -> CellScores:
        """Scores from an analysis table with one row per (``layer``, ``expert``) and a ``value`` column.

        ``signed`` defaults to whether any value is negative. A table with several rows per cell
        (e.g. fTRI of several domains, or stats grouped ``by`` a tag) is refused: filter it first.
        """
        missing = {"layer", "expert", value} - set(table.columns)
        if missing:
            raise ValueError(f"the score table lacks the columns {sorted(missing)}; it has {list(table.columns)}")
        cells = table[["layer", "expert"]]
        if cells.duplicated().any():
            raise ValueError(
                f"the score table has several rows per (layer, expert) (other columns: "
                f"{[c for c in table.columns if c not in ('layer', 'expert', value)]}); keep one group, e.g. table[table.domain == 'code']"
            )
        values = {
            (int(layer), int(expert)): float(score)
            for layer, expert, score in zip(table["layer"], table["expert"], table[value])
            if not math.isnan(float(score))
        }
        if signed is None:
            signed = any(score < 0 for score in values.values())
        return cls(name or value, values, signed)

    @property
    def limit(self) -> float:
        """The largest absolute score (the end of the colour scale); 0 for no scores."""
        return max((abs(score) for score in self.values.values()), default=0.0)

    def color(self, layer: int, expert: int) -> str | None:
        """The cell's background as a CSS ``rgb(...)``, or ``None`` when the cell has no score.

        Signed scores: blue (negative) through white (0) to red (positive), scaled by :attr:`limit`.
        Unsigned: white (0) to dark blue (the largest score).
        """
        score = self.values.get((layer, expert))
        if score is None:
            return None
        share = abs(score) / self.limit if self.limit else 0.0
        if not self.signed:
            end = SEQUENTIAL_END
        else:
            end = POSITIVE_END if score >= 0 else NEGATIVE_END
        red, green, blue = (round(255 + (channel - 255) * share) for channel in end)
        return f"rgb({red}, {green}, {blue})"


def text_color(background: str) -> str:
    """Black or white, whichever reads better on an ``rgb(r, g, b)`` background."""
    red, green, blue = (int(part) for part in background[background.index("(") + 1 : -1].split(","))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "white"


def token_diff(baseline: Sequence[str], steered: Sequence[str]) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Align two token sequences; per side, each piece with whether it differs from the other side.

    A piece is unchanged when it belongs to a longest matching block (:class:`difflib.SequenceMatcher`
    without its junk heuristic); inserted, deleted and replaced pieces are marked changed.
    """
    matcher = difflib.SequenceMatcher(a=list(baseline), b=list(steered), autojunk=False)
    same_a, same_b = [False] * len(baseline), [False] * len(steered)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            same_a[block.a + offset] = same_b[block.b + offset] = True
    return (
        [(piece, not same) for piece, same in zip(baseline, same_a)],
        [(piece, not same) for piece, same in zip(steered, same_b)],
    )


class ExpertGridState(Observable):
    """Per (layer, expert) a mode among :data:`MODES` (default ``"on"``) plus shared :class:`Options`.

    Every change (``set``, ``toggle``, ``mark``, ``clear``, ``configure``, ``apply_spec``) can be
    reverted with :meth:`undo`; a change that changes nothing is not recorded. Observers
    (:meth:`observe`) are called after every change of modes, options, selection or shading.
    """

    def __init__(self, layers: Sequence[GridLayer], options: Options = Options()) -> None:
        if not layers:
            raise ValueError("the grid needs at least one MoE layer")
        self.layers: dict[int, GridLayer] = {layer.index: layer for layer in layers}
        self._modes: dict[tuple[int, int], Mode] = {}  # only cells that are not "on"
        self._options = _checked(options)
        self._history: list[_Snapshot] = []
        Observable.__init__(self)
        self._selection: tuple[tuple[int, int], ...] = ()
        self._shading: CellScores | None = None
        self._checked: tuple[Intervention, weakref.ref[nn.Module], str | None] | None = None  # problem()'s last answer

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
        """The options shared by every cell."""
        return self._options

    def mode(self, layer: int, expert: int) -> Mode:
        """The mode of one cell (``"on"`` unless changed)."""
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
        """The validation message, or ``None`` if the grid can be applied to ``model``. The answer is
        kept until the grid's spec or the model changes (the grid view asks on every redraw)."""
        spec = self.to_spec()
        if self._checked is not None and self._checked[0] == spec and self._checked[1]() is model:
            return self._checked[2]
        try:
            self.validate(model)
        except SpecError as error:
            problem: str | None = str(error)
        else:
            problem = None
        self._checked = (spec, weakref.ref(model), problem)
        return problem

    @property
    def selection(self) -> tuple[tuple[int, int], ...]:
        """The selected (layer, expert) cells, in the order they were selected."""
        return self._selection

    @property
    def shading(self) -> CellScores | None:
        """The scores shading the grid, or ``None``."""
        return self._shading

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

    def select(self, cells: Iterable[tuple[int, int]], *, add: bool = False) -> None:
        """Select cells (replacing the selection, or adding to it with ``add``). Not an undo step:
        the selection is where the user looks, not a steering change."""
        chosen = [(int(layer), int(expert)) for layer, expert in cells]
        for cell in chosen:
            self._check_cell(*cell)
        selection = tuple(dict.fromkeys([*self._selection, *chosen] if add else chosen))
        if selection != self._selection:
            self._selection = selection
            self._notify()

    def mark_selection(self, mode: Mode) -> None:
        """Put every selected cell in ``mode`` (one undo step), e.g. heatmap picks sent to the grid."""
        if not self._selection:
            raise ValueError("nothing is selected: click experts in the grid or a heatmap first")
        chosen: dict[int, list[int]] = {}
        for layer, expert in self._selection:
            chosen.setdefault(layer, []).append(expert)
        self.mark(chosen, mode)

    def shade(self, scores: CellScores | None) -> None:
        """Shade the grid by ``scores`` (``None`` removes the shading). Cells outside the grid are refused."""
        if scores is not None:
            for cell in scores.values:
                self._check_cell(*cell)
        if scores != self._shading:
            self._shading = scores
            self._notify()

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
            if getattr(part, "renormalize", False) or getattr(getattr(part, "mode", None), "renormalize", False):
                raise ValueError(f"the grid does not show renormalised {part.kind}; apply that spec with intervene() directly")
            if part.tokens not in SCOPES:
                raise ValueError(f"the grid steers {', '.join(SCOPES)} tokens; this {part.kind} applies to positions {part.tokens}")
            found["scope"].add(part.tokens)
            if isinstance(part, Disable):
                found["disable_mode"].add(part.mode.name)
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
        self._notify()
        return True

    def _change(self, modes: dict[tuple[int, int], Mode], options: Options) -> None:
        if modes == self._modes and options == self._options:
            return
        self._history.append(_Snapshot(self._modes, self._options))
        self._modes, self._options = dict(modes), options
        self._notify()

    def _check_cell(self, layer: int, expert: int) -> None:
        grid_layer = self.layers.get(layer)
        if grid_layer is None:
            raise ValueError(f"layer {layer} is not an MoE layer of this grid; MoE layers are {sorted(self.layers)}")
        if not 0 <= expert < grid_layer.num_experts:
            raise ValueError(f"expert {expert} is out of range in layer {layer}: experts are 0-{grid_layer.num_experts - 1}")

    # --- running --------------------------------------------------------------------------------
    def compare(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[str],
        max_new_tokens: int = 16,
        *,
        references: Sequence[str | None] | None = None,
        on_progress: Callable[[GenerationProgress], None] | None = None,
        on_result: Callable[[PromptComparison], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[PromptComparison]:
        """Generate each prompt greedily without and with :meth:`to_spec`, tracing both runs.

        Validates first (raises :class:`SpecError` before generating anything). Prompts run one
        at a time, so no padding enters either run.

        Args:
            references: per prompt, a continuation (or ``None``) whose log-probability is scored
                under both runs with :func:`moelens.evaluation.continuation_logprob`; its tokens
                count as generated tokens, so a ``"generated"`` scope steers exactly them.
            on_progress: called with every new token of either run (for streaming views).
            on_result: called with each prompt's comparison as soon as it is complete.
            cancelled: polled before each prompt and after each generated token; once it returns
                ``True`` the comparisons finished so far are returned (the interrupted prompt is
                left out).
        """
        import torch

        import moelens
        from moelens.analysis import routing_stability
        from moelens.evaluation import continuation_logprob

        if references is not None and len(references) != len(prompts):
            raise ValueError(f"{len(references)} references for {len(prompts)} prompts: give one per prompt (None to skip one)")
        self.validate(model)
        spec = self.to_spec()
        device = input_device(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stop = cancelled or (lambda: False)

        def generate(index: int, run: Literal["baseline", "steered"], batch: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], Tracer] | None:
            streamer = _PieceStreamer(tokenizer, lambda pieces: on_progress and on_progress(GenerationProgress(index, len(prompts), run, pieces)))
            with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as tracer:
                output = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    streamer=streamer, stopping_criteria=_stopping_when(stop),
                )
            if stop():
                return None
            # the streamer decoded every new token as it came: its pieces are the continuation's
            assert streamer.decoder.token_ids == output[0, batch["input_ids"].shape[1] :].tolist()
            return tuple(streamer.decoder.pieces), tracer

        results: list[PromptComparison] = []
        for index, prompt in enumerate(prompts):
            if stop():
                break
            reference = references[index] if references is not None else None
            batch = tokenizer([prompt], return_tensors="pt").to(device)
            baseline = generate(index, "baseline", batch)
            baseline_score = continuation_logprob(model, tokenizer, prompt, reference) if reference and baseline else None
            with moelens.intervene(model, spec):
                steered = generate(index, "steered", batch) if baseline else None
                steered_score = continuation_logprob(model, tokenizer, prompt, reference) if reference and steered else None
            if baseline is None or steered is None:
                break
            stability = routing_stability(baseline[1], steered[1])
            events = int(stability["tokens"].sum())
            changed = float(stability["changed_tokens"].sum()) / events if events else 0.0
            scores = [ReferenceScore(*score) if score else None for score in (baseline_score, steered_score)]
            results.append(PromptComparison(prompt, baseline[0], steered[0], changed, events, baseline[1], steered[1], reference, *scores))
            if on_result is not None:
                on_result(results[-1])
        return results


class _PieceStreamer:
    """A transformers streamer (``put``/``end``) that reports the decoded pieces generated so far.

    ``generate`` first puts the prompt, then each new token; only the new tokens are kept.
    """

    def __init__(self, tokenizer: Any, report: Callable[[tuple[str, ...]], object]) -> None:
        self.decoder, self.report = PieceDecoder(tokenizer), report
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.decoder.add(token_id)
        self.report(tuple(self.decoder.pieces))

    def end(self) -> None:
        pass


def _stopping_when(stop: Callable[[], bool]) -> Any:
    """A stopping criterion that ends every row of a generation once ``stop()`` is true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), stop(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


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
