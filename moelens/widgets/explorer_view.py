"""The routing explorer as ipywidgets: a prompt and a layer picker over HTML drawn from
:class:`~moelens.widgets.explorer.RoutingExplorerState`.

Tokens are HTML: hovering one shows its routing at every layer (a tooltip), clicking it shows the
same text in a box under it (CSS on the focused token, no JavaScript, so it also works in an
exported notebook).
Colours: a translucent qualitative palette per expert over the theme's background, text and
borders from JupyterLab's CSS variables (light and dark themes).
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

try:
    import ipywidgets as widgets
except ImportError as error:
    raise ImportError("the routing explorer needs ipywidgets: pip install 'moelens[notebook]'") from error

from moelens.widgets.explorer import OTHER_COLOR, RoutingExplorerState, Token

if TYPE_CHECKING:
    from moelens.store import Trace

_TEXT = "color:var(--jp-content-font-color1, #212121)"
_FLOW = f"{_TEXT};font-family:var(--jp-code-font-family, monospace);font-size:14px;line-height:1.9;white-space:pre-wrap"
_TOKEN = "border-radius:3px;padding:1px 0;cursor:pointer"
_CHANGED = "outline:2px solid var(--jp-error-color1, #d32f2f);outline-offset:-1px"
# A clicked token takes the focus, which shows its detail box; clicking elsewhere hides it. The
# detail is also hidden inline, so where a front end drops <style> only the hover tooltip remains.
_STYLE = f"""<style>
.moelens-explorer-view .moelens-token-box {{position:relative}}
.moelens-explorer-view .moelens-token:focus {{outline:2px solid var(--jp-brand-color1, #1976d2)}}
.moelens-explorer-view .moelens-token:focus + .moelens-token-detail {{display:block !important}}
.moelens-explorer-view .moelens-token-detail {{position:absolute;left:0;top:100%;z-index:10;{_TEXT};background:var(--jp-layout-color1, white);
  border:1px solid var(--jp-border-color1, #9e9e9e);box-shadow:0 2px 6px rgba(0, 0, 0, 0.3);padding:4px 8px;margin-top:2px;
  font-size:12px;font-style:normal;line-height:1.5;white-space:pre}}
</style>"""
_BAR = "display:inline-block;height:12px;vertical-align:middle;background:var(--jp-error-color1, #d32f2f)"
_BAR_TRACK = "display:inline-block;width:200px;height:12px;vertical-align:middle;background:var(--jp-layout-color3, #e0e0e0);margin:0 6px"


class RoutingExplorer(widgets.VBox):
    """Explore a trace prompt by prompt: tokens coloured by their first-choice expert at a layer,
    every token's routing on hover and click, and with a second trace (``other``, e.g. steered)
    both shown aligned by position with every changed decision outlined and a per-layer
    "changed" bar. Arguments as :class:`~moelens.widgets.explorer.RoutingExplorerState`, or a
    ready ``state``; changes made to the state from code redraw the view."""

    def __init__(
        self,
        trace: Trace | None = None,
        other: Trace | None = None,
        *,
        state: RoutingExplorerState | None = None,
        tokenizer: Any = None,
        prompt_id: Any = None,
        layer: int | None = None,
        names: tuple[str, str] = ("baseline", "steered"),
    ) -> None:
        if state is None:
            if trace is None:
                raise ValueError("give a trace (moelens.trace(...) or moelens.read_trace(path)) or a RoutingExplorerState")
            state = RoutingExplorerState(trace, other, tokenizer=tokenizer, prompt_id=prompt_id, layer=layer, names=names)
        self.state = state
        self.prompt = widgets.Dropdown(options=[(str(i), i) for i in state.prompt_ids], value=state.prompt_id, description="prompt")
        self.layer = widgets.Dropdown(options=[(f"L{i}", i) for i in state.layers], value=state.layer, description="layer")
        self.view = widgets.HTML()
        self.prompt.observe(lambda change: self._select(prompt_id=change["new"]), names="value")
        self.layer.observe(lambda change: self._select(layer=change["new"]), names="value")
        state.observe(lambda _: self.render())
        super().__init__([widgets.HBox([self.prompt, self.layer]), self.view])
        self.add_class("moelens-explorer")
        self.render()

    def _select(self, **selection: Any) -> None:
        self.state.select(**selection)

    def render(self) -> None:
        """Show the state's prompt and layer (the pickers follow a selection made from code)."""
        self.prompt.value, self.layer.value = self.state.prompt_id, self.state.layer
        self.view.value = explorer_html(self.state)


def explorer_html(state: RoutingExplorerState) -> str:
    """The explorer's HTML for the state's prompt and layer: legend, (with a second trace) the
    per-layer changed bars, and the tokens (aligned with the second trace's, when there is one)."""
    colors = state.colors()
    parts = [legend_html(state, colors)]
    if state.other is not None:
        parts += [changed_bars_html(state), aligned_html(state, colors)]
    else:
        tokens = "".join(token_html(state, token, colors) for token in state.tokens)
        parts.append(f"<div class='moelens-tokens' style='{_FLOW}'>{tokens}</div>")
    return f"<div class='moelens-explorer-view' style='{_TEXT}'>{_STYLE}{''.join(parts)}</div>"


def token_html(state: RoutingExplorerState, token: Token, colors: dict[int, str], *, other: bool = False) -> str:
    """One token of the trace (of the second trace with ``other``) as a ``moelens-token``: its
    background is ``colors[its first-choice expert at the state's layer]``, it is outlined
    (``moelens-token-changed``) when its expert set changed there, hovering shows
    :meth:`~RoutingExplorerState.describe` and a click (focus) shows the same text (``moelens-token-detail``).
    With a second trace (the aligned columns) a newline shows as ``↵``; the column ends the line."""
    expert = state.top_expert(token.position, other=other)
    color = colors.get(expert, OTHER_COLOR) if expert is not None else "transparent"
    classes = ["moelens-token"]
    style = f"{_TOKEN};background:{color}"
    if state.other is not None and state.decision(token.position).changed:
        classes.append("moelens-token-changed")
        style += f";{_CHANGED}"
    if token.special:
        style += ";opacity:0.6"
    if token.generated:
        style += ";font-style:italic"
    text = token.text if state.other is None else token.text.replace("\n", "↵")
    shown = html.escape(text) if text else "<span style='opacity:0.5'>·</span>"  # an empty piece (part of a character) stays clickable
    description = html.escape(state.describe(token.position))
    return (
        f"<span class='moelens-token-box'><span class='{' '.join(classes)}' style='{style}' tabindex='0' title='{description}'>{shown}</span>"
        f"<span class='moelens-token-detail' style='display:none'>{description}</span></span>"
    )


def aligned_html(state: RoutingExplorerState, colors: dict[int, str]) -> str:
    """Both traces' tokens in columns, one per position: the trace's on top, the second's below;
    a column whose two tokens differ (or where one trace has none) is underlined."""
    empty = "<span style='opacity:0.4'>∅</span>"
    columns = []
    for aligned in state.aligned():
        sides = (aligned.token, aligned.other)
        cells = [token_html(state, token, colors, other=side == 1) if token is not None else empty for side, token in enumerate(sides)]
        differs = ";border-bottom:2px dotted var(--jp-warn-color0, #e65100)" if aligned.differs else ""
        column = (
            f"<span class='moelens-column' style='display:inline-flex;flex-direction:column;vertical-align:top;margin:0 1px 6px 0{differs}'>"
            f"<span>{cells[0]}</span><span>{cells[1]}</span></span>"
        )
        ends_line = any(token is not None and "\n" in token.text for token in sides)
        columns.append(column + ("<br>" if ends_line else ""))
    top, below = (html.escape(name) for name in state.names)
    return (
        f"<div style='font-size:12px;opacity:0.8'>top: {top}; below: {below}</div>"
        f"<div class='moelens-tokens' style='{_FLOW}'>{''.join(columns)}</div>"
    )


def legend_html(state: RoutingExplorerState, colors: dict[int, str]) -> str:
    """A swatch per expert colour at the state's layer (experts beyond the palette share the last, grey, swatch)."""
    swatch = "display:inline-block;min-width:28px;padding:0 4px;margin:2px;border-radius:3px;text-align:center"
    named = [f"<span style='{swatch};background:{color}'>e{expert}</span>" for expert, color in colors.items() if color != OTHER_COLOR]
    others = [expert for expert, color in colors.items() if color == OTHER_COLOR]
    if others:
        named.append(f"<span style='{swatch};background:{OTHER_COLOR}'>other ({len(others)} experts)</span>")
    changed = f"; <span style='{_CHANGED};padding:0 4px'>changed</span> expert set at L{state.layer}" if state.other is not None else ""
    return (
        f"<div class='moelens-legend' style='font-size:13px'>first-choice expert at L{state.layer}: {''.join(named)}"
        f"; <i>generated tokens</i>{changed}; hover or click a token for its routing at every layer</div>"
    )


def changed_bars_html(state: RoutingExplorerState) -> str:
    """Per layer, the fraction of the prompt's positions whose expert set changed, as a bar."""
    rows = []
    for change in state.layer_changes():
        width = 0 if math.isnan(change.fraction) else round(200 * change.fraction)
        label = "no matched position" if not change.matched else f"{change.changed}/{change.matched} ({change.fraction:.0%})"
        rows.append(
            f"<div class='moelens-changed-bar' style='font-size:12px'><span style='display:inline-block;width:36px'>L{change.layer}</span>"
            f"<span style='{_BAR_TRACK}'><span style='{_BAR};width:{width}px'></span></span>{label}</div>"
        )
    return f"<div style='margin:4px 0'><div style='font-size:13px'>changed expert sets per layer</div>{''.join(rows)}</div>"
