"""The steering grid as ipywidgets: callbacks call :class:`ExpertGridState`, which tells the view to redraw.

Generation runs in a worker thread so the notebook stays responsive: the Generate button turns
into a busy indicator, Cancel stops after the current token, and the comparison fills in token by
token. Colours come from JupyterLab's CSS variables where a theme should decide (light and dark).
"""

from __future__ import annotations

import base64
import html
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:
    import ipywidgets as widgets
except ImportError as error:
    raise ImportError("the steering grid needs ipywidgets: pip install 'moelens[notebook]'") from error

from moelens.widgets.state import (
    DISABLE_MODES,
    MODES,
    NEGATIVE_END,
    POSITIVE_END,
    SCOPES,
    SEQUENTIAL_END,
    CellScores,
    ExpertGridState,
    GenerationProgress,
    PromptComparison,
    text_color,
    token_diff,
)

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

log = logging.getLogger(__name__)

COLORS = {"on": "var(--jp-layout-color2, #e8e8e8)", "disabled": "#d9534f", "forced": "#3d8b3d", "boosted": "#e08e0b"}
_ON_TEXT = "var(--jp-ui-font-color1, black)"
SELECT = "select"  # the brush that selects a cell (and opens its card) instead of painting it
_SELECTED_BORDER = "2px solid var(--jp-brand-color1, #1976d2)"
_NO_SHADING = "none"


class ExpertGrid(widgets.VBox):
    """A layer x expert grid of toggle buttons with a side-by-side baseline/steered generation.

    Click a cell to put it in the selected mode (click again to switch it back on), or with the
    ``select`` brush to select it (and show its card when ``card`` is given). Changes made to
    :attr:`state` from code redraw the grid too. ``Generate`` validates the grid against the model,
    then streams each prompt (one per line of the text box) generated greedily without and with
    the steering, with the changed tokens highlighted, the fraction of routing decisions that
    changed and, for prompts given a reference continuation, its log-probability under both runs.

    Args:
        ftri_tables: {domain: :func:`moelens.analysis.ftri_scores` table}: a button marks a domain's
            top experts in the selected mode, and each domain's fTRI difference can shade the grid.
        scores: more shadings (e.g. ``CellScores.from_table(expert_frequency(trace), "share")``).
        card: ``card(layer, expert) -> HTML`` shown for the selected cell (e.g. an expert card).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        state: ExpertGridState | None = None,
        *,
        prompts: str = "",
        references: str = "",
        ftri_tables: Mapping[str, pd.DataFrame] | None = None,
        scores: Sequence[CellScores] = (),
        card: Callable[[int, int], str] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.comparisons: list[PromptComparison] = []
        self.ftri_tables = dict(ftri_tables or {})
        self.card = card
        self.scores = {s.name: s for s in [*scores, *self._ftri_scores()]}
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._run_message = ""
        self._drawing = False  # option widgets set while drawing must not feed back into the state
        self._lock = threading.RLock()  # the worker's last render and a click's change take turns
        self._card_shown: tuple[int, int] | None = None  # the cell whose card card_view holds
        self._stop_observing: Callable[[], None] = lambda: None

        self.mode = widgets.ToggleButtons(options=[*MODES, SELECT], value="disabled", description="brush")
        self.factor = widgets.FloatLogSlider(value=4.0, base=2, min=-6, max=8, step=0.25, description="boost x")
        self.scope = widgets.Dropdown(options=SCOPES, description="tokens")
        self.disable_mode = widgets.Dropdown(options=DISABLE_MODES, description="disable")
        self.shading = widgets.Dropdown(options=[_NO_SHADING, *self.scores], value=_NO_SHADING, description="shade by")
        self.undo_button = widgets.Button(description="Undo", icon="undo")
        self.clear_button = widgets.Button(description="Clear", icon="eraser")
        self.selection_buttons = {
            mode: widgets.Button(description=f"selection: {verb}", tooltip=f"put the selected experts in mode {mode!r}")
            for mode, verb in (("disabled", "disable"), ("forced", "force"), ("boosted", "boost"))
        }
        self.prompts = widgets.Textarea(value=prompts, placeholder="one prompt per line", layout=widgets.Layout(width="100%", height="80px"))
        self.references = widgets.Textarea(
            value=references,
            placeholder="optional: a reference continuation per prompt line (same line number); its log-probability is scored",
            layout=widgets.Layout(width="100%", height="60px"),
        )
        self.max_new_tokens = widgets.IntSlider(value=16, min=1, max=64, description="new tokens")
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="", layout=widgets.Layout(visibility="hidden"))
        self.status = widgets.HTML()
        self.legend = widgets.HTML()
        self.spec_view = widgets.HTML()
        self.card_view = widgets.HTML()
        self.comparison = widgets.HTML()
        self.cells: dict[tuple[int, int], widgets.Button] = {}
        self.state = state if state is not None else ExpertGridState.from_model(model)
        rows = [self._layer_row(layer.index, layer.num_experts) for layer in self.state.layers.values()]

        self.factor.observe(lambda change: self._configure(boost_factor=change["new"]), names="value")
        self.scope.observe(lambda change: self._configure(scope=change["new"]), names="value")
        self.disable_mode.observe(lambda change: self._configure(disable_mode=change["new"]), names="value")
        self.shading.observe(lambda change: self._act(lambda: self.state.shade(self.scores.get(change["new"]))), names="value")
        self.undo_button.on_click(lambda _: self._act(self.state.undo))
        self.clear_button.on_click(lambda _: self._act(self.state.clear))
        for mode, button in self.selection_buttons.items():
            button.on_click(lambda _, mode=mode: self._act(lambda: self.state.mark_selection(mode)))
        self.generate_button.on_click(lambda _: self.generate())
        self.cancel_button.on_click(lambda _: self.cancel())

        controls = [
            self.mode,
            widgets.HBox([self.factor, self.scope, self.disable_mode, self.shading]),
            widgets.HBox([self.undo_button, self.clear_button, *self.selection_buttons.values()]),
            *([self._ftri_controls()] if self.ftri_tables else []),
        ]
        generation = [
            self.prompts,
            self.references,
            widgets.HBox([self.max_new_tokens, self.generate_button, self.cancel_button, self.progress]),
            self.comparison,
        ]
        super().__init__([*controls, widgets.VBox(rows), self.legend, self.status, self.card_view, self.spec_view, *generation])
        # stable class names: the browser test (and users' CSS) find the parts by them
        for widget, name in [
            (self, "moelens-grid"), (self.scope, "moelens-scope"), (self.prompts, "moelens-prompts"), (self.references, "moelens-references"),
            (self.generate_button, "moelens-generate"), (self.cancel_button, "moelens-cancel"), (self.status, "moelens-status"),
            (self.card_view, "moelens-card-view"), (self.comparison, "moelens-comparison-view"),
        ]:
            widget.add_class(name)
        self.render()

    # --- the state --------------------------------------------------------------------------------
    @property
    def state(self) -> ExpertGridState:
        """The grid's state; assigning another state redraws the view and follows that state."""
        return self._state

    @state.setter
    def state(self, state: ExpertGridState) -> None:
        self._stop_observing()
        self._state = state
        self._stop_observing = state.observe(lambda _: self.render())
        if self.cells:
            self.render()

    def _ftri_scores(self) -> list[CellScores]:
        return [CellScores.from_table(table, "difference", name=f"fTRI difference: {domain}", signed=True) for domain, table in self.ftri_tables.items()]

    def _layer_row(self, layer: int, num_experts: int) -> widgets.HBox:
        buttons = []
        for expert in range(num_experts):
            button = widgets.Button(description=str(expert), layout=widgets.Layout(width="34px", height="24px", padding="0px", margin="1px"))
            button.on_click(lambda _, cell=(layer, expert): self._click(*cell))
            button.add_class("moelens-cell")
            self.cells[(layer, expert)] = button
            buttons.append(button)
        return widgets.HBox([widgets.Label(f"L{layer}", layout=widgets.Layout(width="36px")), *buttons])

    def _click(self, layer: int, expert: int) -> None:
        if self.mode.value == SELECT:
            self._act(lambda: self.state.select([(layer, expert)]))
        else:
            self._act(lambda: self.state.toggle(layer, expert, self.mode.value))

    def _ftri_controls(self) -> widgets.HBox:
        from moelens.analysis.ftri import top_experts

        self.ftri_domain = widgets.Dropdown(options=sorted(self.ftri_tables), description="fTRI of")
        self.ftri_count = widgets.BoundedIntText(value=8, min=1, max=10_000, description="top n", layout=widgets.Layout(width="140px"))
        self.ftri_button = widgets.Button(description="Mark top experts")

        def mark_top_experts() -> None:
            # only experts the domain over-uses: with a large count, the rest of the table is negative
            self.state.mark(top_experts(self.ftri_tables[self.ftri_domain.value], self.ftri_count.value), self.mode.value)

        self.ftri_button.on_click(lambda _: self._act(mark_top_experts))
        return widgets.HBox([self.ftri_domain, self.ftri_count, self.ftri_button])

    def _configure(self, **option: Any) -> None:
        self._act(lambda: self.state.configure(**option))

    def _act(self, action: Callable[[], object]) -> None:
        """Run a state change; a rejected change shows its message in the widget (the state's
        observers redraw after an accepted one)."""
        with self._lock:
            if self._drawing:  # an option widget written by render() on this thread
                return
            try:
                action()
            except ValueError as error:
                self._run_message = _error_html(error)
                self.render()

    # --- drawing ----------------------------------------------------------------------------------
    def render(self) -> None:
        """Show the state: cell colours, selection, option widgets, legend, spec, card and any problem."""
        with self._lock:
            self._draw()

    def _draw(self) -> None:
        state = self.state
        selection = set(state.selection)
        shading = state.shading
        for (layer, expert), button in self.cells.items():
            mode = state.mode(layer, expert)
            shade = shading.color(layer, expert) if shading is not None and mode == "on" else None
            button.style.button_color = shade or COLORS[mode]
            button.style.text_color = text_color(shade) if shade else (_ON_TEXT if mode == "on" else "white")
            button.layout.border = _SELECTED_BORDER if (layer, expert) in selection else ""
            score = shading.values.get((layer, expert)) if shading is not None else None
            button.tooltip = f"layer {layer}, expert {expert}: {mode}" + (f"; {shading.name} {score:.4g}" if score is not None else "")
        options = state.options
        self._drawing = True
        try:
            self.factor.value, self.scope.value, self.disable_mode.value = options.boost_factor, options.scope, options.disable_mode
            if shading is not None and self.scores.get(shading.name) != shading:  # shading set from code
                self.scores[shading.name] = shading
                self.shading.options = [_NO_SHADING, *self.scores]
            self.shading.value = shading.name if shading is not None else _NO_SHADING
        finally:
            self._drawing = False
        self.legend.value = legend_html(shading)
        self.spec_view.value = spec_html(state)
        shown = state.selection[-1] if state.selection else None
        if self.card is not None and shown is not None and shown != self._card_shown:  # a card costs queries
            self.card_view.value = self.card(*shown)
        self._card_shown = shown
        problem = state.problem(self.model)
        busy = self.busy
        self.generate_button.disabled = problem is not None or busy
        self.generate_button.description = "Generating…" if busy else "Generate"
        self.generate_button.icon = "spinner" if busy else "play"
        self.cancel_button.disabled = not busy
        warning = f"<br>{_error_html(problem)}" if problem else ""
        message = f"<br>{self._run_message}" if self._run_message else ""
        self.status.value = f"<code>{html.escape(state.summary())}</code>{warning}{message}"

    # --- generating -------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a generation is running (the worker clears ``_worker`` as its last act)."""
        return self._worker is not None

    def generate(self) -> threading.Thread | None:
        """Start comparing baseline and steered generations of the prompts in the text box.

        Runs in a worker thread (returned; ``join()`` it to wait) and streams into the comparison
        table; problems show in the widget's status line. ``None`` when nothing was started. While
        it runs the kernel stays free, but the model is traced and (for the steered run) steered:
        a cell that runs the same model meanwhile is steered too and lands in the comparison's trace.
        """
        if self.busy:
            return None
        prompts = [line for line in self.prompts.value.splitlines() if line.strip()]
        if not prompts:
            self._run_message = _error_html("write at least one prompt")
            self.render()
            return None
        lines = self.references.value.splitlines()
        references = [lines[i] if i < len(lines) and lines[i].strip() else None for i in range(len(prompts))]
        self._cancel.clear()
        self._run_message = ""
        self.progress.max, self.progress.value = 2 * len(prompts), 0
        self.progress.layout.visibility = "visible"
        worker = threading.Thread(target=self._run, args=(prompts, references, self.max_new_tokens.value), daemon=True)
        self._worker = worker  # the worker clears it when done, maybe before this method returns
        self.render()  # busy, before start: a quick run's own "not busy" render must come last
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the running generation after its current token."""
        self._cancel.set()

    def _run(self, prompts: list[str], references: list[str | None], max_new_tokens: int) -> None:
        finished: list[PromptComparison] = []
        summary = self.state.summary()

        def show(progress: GenerationProgress) -> None:
            self.progress.value = 2 * progress.prompt_index + (progress.run == "steered")
            self.progress.description = f"{progress.prompt_index + 1}/{progress.prompts}"
            self.comparison.value = comparison_table(finished, summary, streaming=progress)

        try:
            results = self.state.compare(
                self.model, self.tokenizer, prompts, max_new_tokens,
                references=references, on_progress=show, on_result=finished.append, cancelled=self._cancel.is_set,
            )
            self.comparisons = results
            self.comparison.value = comparison_table(results, summary)
            if self._cancel.is_set():
                self._run_message = f"cancelled after {len(results)} of {len(prompts)} prompts"
        except Exception as error:  # shown in the widget: a notebook user never sees the kernel log
            log.exception("generation failed")
            self._run_message = _error_html(error)
        finally:
            self._worker = None
            self.progress.layout.visibility = "hidden"
            self.render()


def _error_html(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return f"<b style='color:var(--jp-error-color1, #d9534f)'>{html.escape(text)}</b>"


def legend_html(shading: CellScores | None) -> str:
    """The grid's legend: a swatch per mode, and the shading's scale when the grid is shaded."""
    swatch = "display:inline-block;width:14px;height:14px;margin:0 4px 0 10px;vertical-align:middle;border:1px solid var(--jp-border-color1, #999)"
    items = "".join(f"<span style='{swatch};background:{COLORS[mode]}'></span>{mode}" for mode in MODES)
    items += f"<span style='{swatch};border:{_SELECTED_BORDER}'></span>selected"
    if shading is not None and shading.values:
        low = -shading.limit if shading.signed else 0.0
        ends = (NEGATIVE_END, (255, 255, 255), POSITIVE_END) if shading.signed else ((255, 255, 255), SEQUENTIAL_END)
        gradient = f"linear-gradient(to right, {', '.join(f'rgb{end}' for end in ends)})"
        items += (
            f"<br><span style='margin-left:10px'>{html.escape(shading.name)} (cells that are on): {low:.3g}</span>"
            f"<span style='display:inline-block;width:160px;height:12px;margin:0 6px;vertical-align:middle;background:{gradient}'></span>{shading.limit:.3g}"
        )
    return f"<div style='color:var(--jp-ui-font-color1)'>{items}</div>"


def spec_html(state: ExpertGridState) -> str:
    """The grid's intervention spec as JSON, folded, with a download link (works offline)."""
    text = state.to_spec().to_json()
    data = base64.b64encode(text.encode()).decode()
    return (
        "<details><summary>intervention spec (JSON)</summary>"
        f"<pre style='white-space:pre-wrap'>{html.escape(text, quote=False)}</pre>"
        f"<a download='moelens-spec.json' href='data:application/json;base64,{data}'>download spec.json</a></details>"
    )


_CHANGED = {"baseline": "rgba(217, 83, 79, 0.35)", "steered": "rgba(61, 139, 61, 0.35)"}


def _pieces_html(pieces: Sequence[tuple[str, bool]], side: str) -> str:
    # a changed line break gets a visible mark: a highlighted bare newline would be an empty box
    return "".join(
        f"<span class='moelens-changed' style='background:{_CHANGED[side]}'>{html.escape(piece).replace(chr(10), '↵' + chr(10))}</span>"
        if changed
        else html.escape(piece)
        for piece, changed in pieces
    )


def comparison_table(comparisons: Sequence[PromptComparison], summary: str, *, streaming: GenerationProgress | None = None) -> str:
    """An HTML table: prompt, baseline and steered continuation side by side with the tokens that
    differ highlighted (full text, whitespace kept), routing changed, and the reference
    continuation's log-probability under each run. ``streaming``: a row for the prompt in progress."""
    cell = "style='white-space:pre-wrap;font-family:var(--jp-code-font-family, monospace);text-align:left;vertical-align:top;padding:4px'"
    rows = []
    for c in comparisons:
        baseline, steered = token_diff(c.baseline_pieces, c.steered_pieces)
        reference = ""
        if c.baseline_reference and c.steered_reference:
            delta = c.steered_reference.logprob - c.baseline_reference.logprob
            count = c.baseline_reference.tokens
            reference = f"{c.baseline_reference.logprob:.2f} → {c.steered_reference.logprob:.2f} ({delta:+.2f}) over {count} token{'s' * (count != 1)}"
        rows.append(
            f"<tr class='moelens-row'><td {cell}>{html.escape(c.prompt)}</td><td {cell}>{_pieces_html(baseline, 'baseline')}</td>"
            f"<td {cell}>{_pieces_html(steered, 'steered')}</td><td {cell}>{c.routing_changed:.0%} of {c.routing_events}</td><td {cell}>{reference}</td></tr>"
        )
    if streaming is not None:
        text = html.escape("".join(streaming.pieces))
        rows.append(f"<tr><td {cell}><i>prompt {streaming.prompt_index + 1} of {streaming.prompts}</i></td><td {cell} colspan='4'><i>{streaming.run}:</i> {text}</td></tr>")
    header = "".join(f"<th {cell}>{name}</th>" for name in ("prompt", "baseline", "steered", "routing changed", "reference log-prob (nats), baseline → steered"))
    style = "border-collapse:collapse;color:var(--jp-content-font-color1)"
    return f"<p><code>{html.escape(summary)}</code></p><table class='moelens-comparison' style='{style}'><tr>{header}</tr>{''.join(rows)}</table>"
