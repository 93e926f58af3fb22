"""The steering grid as ipywidgets: every callback calls :class:`ExpertGridState` and re-renders."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

try:
    import ipywidgets as widgets
except ImportError as error:
    raise ImportError("the steering grid needs ipywidgets: pip install 'moelens[notebook]'") from error

from moelens.widgets.state import DISABLE_MODES, MODES, SCOPES, ExpertGridState, PromptComparison

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

COLOURS = {"on": "#e8e8e8", "disabled": "#d9534f", "forced": "#5cb85c", "boosted": "#f0ad4e"}
_CELL = widgets.Layout(width="34px", height="24px", padding="0px", margin="1px")


class ExpertGrid(widgets.VBox):
    """A layer x expert grid of toggle buttons with a side-by-side baseline/steered generation.

    Click a cell to put it in the selected mode (click again to switch it back on). ``Generate``
    validates the grid against the model, then shows each prompt (one per line of the text box)
    generated greedily without and with the steering, and the fraction of routing decisions that
    changed. With ``ftri_tables`` ({domain: :func:`moelens.analysis.ftri_scores` table}) a button
    marks a domain's top experts in the selected mode.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        state: ExpertGridState | None = None,
        *,
        prompts: str = "",
        ftri_tables: Mapping[str, pd.DataFrame] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.state = state if state is not None else ExpertGridState.from_model(model)
        self.comparisons: list[PromptComparison] = []
        self.ftri_tables = dict(ftri_tables or {})

        self.mode = widgets.ToggleButtons(options=MODES, value="disabled", description="paint")
        self.factor = widgets.FloatLogSlider(value=self.state.options.boost_factor, base=2, min=-6, max=8, step=0.25, description="boost x")
        self.scope = widgets.Dropdown(options=SCOPES, value=self.state.options.scope, description="tokens")
        self.disable_mode = widgets.Dropdown(options=DISABLE_MODES, value=self.state.options.disable_mode, description="disable")
        self.undo_button = widgets.Button(description="Undo", icon="undo")
        self.clear_button = widgets.Button(description="Clear", icon="eraser")
        self.prompts = widgets.Textarea(value=prompts, placeholder="one prompt per line", layout=widgets.Layout(width="100%", height="80px"))
        self.max_new_tokens = widgets.IntSlider(value=16, min=1, max=64, description="new tokens")
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.cells: dict[tuple[int, int], widgets.Button] = {}
        rows = [self._layer_row(layer.index, layer.num_experts) for layer in self.state.layers.values()]

        self.factor.observe(lambda change: self._configure(boost_factor=change["new"]), names="value")
        self.scope.observe(lambda change: self._configure(scope=change["new"]), names="value")
        self.disable_mode.observe(lambda change: self._configure(disable_mode=change["new"]), names="value")
        self.undo_button.on_click(lambda _: self._after(self.state.undo))
        self.clear_button.on_click(lambda _: self._after(self.state.clear))
        self.generate_button.on_click(lambda _: self.generate())

        controls = [
            self.mode,
            widgets.HBox([self.factor, self.scope, self.disable_mode]),
            widgets.HBox([self.undo_button, self.clear_button]),
            *([self._ftri_controls()] if self.ftri_tables else []),
        ]
        generation = [self.prompts, widgets.HBox([self.max_new_tokens, self.generate_button]), self.output]
        super().__init__([*controls, widgets.VBox(rows), self.status, *generation])
        self.render()

    def _layer_row(self, layer: int, num_experts: int) -> widgets.HBox:
        buttons = []
        for expert in range(num_experts):
            button = widgets.Button(description=str(expert), layout=_CELL)
            button.on_click(lambda _, cell=(layer, expert): self._after(lambda: self.state.toggle(*cell, self.mode.value)))
            self.cells[(layer, expert)] = button
            buttons.append(button)
        return widgets.HBox([widgets.Label(f"L{layer}", layout=widgets.Layout(width="36px")), *buttons])

    def _ftri_controls(self) -> widgets.HBox:
        from moelens.analysis.ftri import specific_experts

        self.ftri_domain = widgets.Dropdown(options=sorted(self.ftri_tables), description="fTRI of")
        self.ftri_count = widgets.BoundedIntText(value=8, min=1, max=10_000, description="top n", layout=widgets.Layout(width="140px"))
        self.ftri_button = widgets.Button(description="Mark top experts")

        def mark_top_experts() -> None:
            # only experts the domain over-uses: with a large count, the rest of the table is negative
            self.state.mark(specific_experts(self.ftri_tables[self.ftri_domain.value], self.ftri_count.value), self.mode.value)

        self.ftri_button.on_click(lambda _: self._after(mark_top_experts))
        return widgets.HBox([self.ftri_domain, self.ftri_count, self.ftri_button])

    def _configure(self, **option: Any) -> None:
        self._after(lambda: self.state.configure(**option))

    def _after(self, action: Callable[[], object]) -> None:
        """Run a state change; a rejected change shows its message instead of raising in the kernel log."""
        try:
            action()
        except ValueError as error:
            self.render(message=str(error))
            return
        self.render()

    def render(self, message: str | None = None) -> None:
        """Show the state: cell colours, option widgets, summary and any validation problem."""
        for (layer, expert), button in self.cells.items():
            mode = self.state.mode(layer, expert)
            button.style.button_color = COLOURS[mode]
            button.tooltip = f"layer {layer}, expert {expert}: {mode}"
        options = self.state.options
        # writing the same value back does not fire observers, so undo does not re-record a change
        self.factor.value, self.scope.value, self.disable_mode.value = options.boost_factor, options.scope, options.disable_mode
        problem = message or self.state.problem(self.model)
        self.generate_button.disabled = problem is not None
        warning = f"<br><b style='color:#d9534f'>{html.escape(problem)}</b>" if problem else ""
        self.status.value = f"<code>{html.escape(self.state.summary())}</code>{warning}"

    def generate(self) -> list[PromptComparison]:
        """Compare baseline and steered generations of the prompts in the text box; show them."""
        prompts = [line for line in self.prompts.value.splitlines() if line.strip()]
        self.output.clear_output()
        if not prompts:
            self.status.value += "<br>write at least one prompt"
            return []
        self.comparisons = self.state.compare(self.model, self.tokenizer, prompts, self.max_new_tokens.value)
        with self.output:
            from IPython.display import HTML, display

            display(HTML(comparison_table(self.comparisons, self.state.summary())))
        return self.comparisons


def comparison_table(comparisons: list[PromptComparison], summary: str) -> str:
    """An HTML table: prompt, baseline and steered continuation side by side, routing changed."""

    def cell(text: str) -> str:
        return f"<td style='white-space:pre-wrap;font-family:monospace;text-align:left'>{html.escape(text)}</td>"

    rows = "".join(
        f"<tr>{cell(c.prompt)}{cell(c.baseline)}{cell(c.steered)}<td>{c.routing_changed:.0%} of {c.routing_events}</td></tr>"
        for c in comparisons
    )
    header = "<tr><th>prompt</th><th>baseline</th><th>steered</th><th>routing changed</th></tr>"
    return f"<p><code>{html.escape(summary)}</code></p><table>{header}{rows}</table>"
