"""Analyses of routing: descriptive statistics, fTRI contrast maps, nPMI, figures (over trace
stores), and super experts and EASY-EP importance (over a live model).

``import moelens.analysis`` is cheap: each name below loads its module (and pandas, DuckDB,
plotly) on first use (PEP 562). Every analysis takes a :class:`moelens.Trace`, in memory
(``moelens.trace(...)``) or on disk (``moelens.scan_trace(...)``), and returns a tidy pandas
DataFrame::

    from moelens import analysis
    trace = moelens.trace(model, prompts=texts, tags={"domain": domains}, tokenizer=tokenizer)
    table = analysis.ftri_scores(trace, tag="domain", target="code")    # or a store: moelens.scan_trace(dir)
    analysis.write_html(analysis.heatmap(table, "difference"), "ftri.html")
    spec = analysis.ftri_spec(table, 10)   # MoTE's switch-off (drop) of the 10 most target-specific experts

Ranked tables (fTRI, nPMI, EASY-EP's combined importance, the super-expert report's massive
activations) carry a ``place`` column, 1 = first place; ``rank`` is kept for the router's choice
order (``routes.rank``, 0 = first choice). Count columns are named by what they count:
``selections`` (routing events, token x slot), ``tokens``, ``prompts``.

Every analysis that picks experts has the same two helpers (module-level, exported flat as
``<analysis>_top_experts`` and ``<analysis>_spec``)::

    top_experts(result, n)             # {layer: sorted expert ids}
    to_spec(result, n, *, kind=...)    # an Intervention on exactly those experts

``n`` counts experts over the whole model (fTRI, nPMI, super experts: their scores compare across
layers, and MoTE and RICE pick experts model-wide), except for EASY-EP, where it counts experts per
layer (its scores are normalised within a layer, and it keeps the same number in each). ``kind``
is the intervention, in the README's words; the default is the paper's: fTRI ``"drop"`` (also
``"reroute"``, ``"force"``), nPMI ``"reweight"`` (also ``"drop"``, ``"reroute"``), EASY-EP ``"keep"``,
super experts ``"drop"`` (also ``"reroute"``; ``n=None``, the default, takes every super expert).
"""

from __future__ import annotations

from moelens._lazy import lazy_attributes
from typing import TYPE_CHECKING

# public name -> (module, attribute); adding an analysis is one line here. A public name must not
# equal a submodule's name (``ftri``, ``npmi``...): importing the submodule would rebind it.
_LAZY: dict[str, tuple[str, str]] = {
    "POSITION_CLASS": ("moelens.analysis.stats", "POSITION_CLASS"),
    "TokenFilter": ("moelens.analysis.token_filter", "TokenFilter"),
    "expert_frequency": ("moelens.analysis.stats", "expert_frequency"),
    "load_balance": ("moelens.analysis.stats", "load_balance"),
    "token_entropy": ("moelens.analysis.stats", "token_entropy"),
    "coactivation": ("moelens.analysis.stats", "coactivation"),
    "transitions": ("moelens.analysis.stats", "transitions"),
    "routing_stability": ("moelens.analysis.stats", "routing_stability"),
    "ftri_scores": ("moelens.analysis.ftri", "ftri_scores"),
    "ftri_top_experts": ("moelens.analysis.ftri", "top_experts"),
    "ftri_spec": ("moelens.analysis.ftri", "to_spec"),
    "benjamini_hochberg": ("moelens.analysis.ftri", "benjamini_hochberg"),
    "npmi_scores": ("moelens.analysis.npmi", "npmi_scores"),
    "npmi_combined": ("moelens.analysis.npmi", "npmi_combined"),
    "npmi_top_experts": ("moelens.analysis.npmi", "top_experts"),
    "npmi_spec": ("moelens.analysis.npmi", "to_spec"),
    "heatmap": ("moelens.analysis.figures", "heatmap"),
    "ranked_bars": ("moelens.analysis.figures", "ranked_bars"),
    "coactivation_matrix": ("moelens.analysis.figures", "coactivation_matrix"),
    "token_view": ("moelens.analysis.figures", "token_view"),
    "write_html": ("moelens.analysis.figures", "write_html"),
    "profile_super_experts": ("moelens.analysis.super_experts", "profile_super_experts"),
    "detect_super_experts": ("moelens.analysis.super_experts", "detect_super_experts"),
    "drop_report": ("moelens.analysis.super_experts", "drop_report"),
    "sink_decay": ("moelens.analysis.super_experts", "sink_decay"),
    "SuperExpertReport": ("moelens.analysis.super_experts", "SuperExpertReport"),
    "DropReport": ("moelens.analysis.super_experts", "DropReport"),
    "super_experts_top_experts": ("moelens.analysis.super_experts", "top_experts"),
    "super_experts_spec": ("moelens.analysis.super_experts", "to_spec"),
    "expert_importance": ("moelens.analysis.easy_ep", "expert_importance"),
    "combined_importance": ("moelens.analysis.easy_ep", "combined_importance"),
    "easy_ep_top_experts": ("moelens.analysis.easy_ep", "top_experts"),
    "easy_ep_spec": ("moelens.analysis.easy_ep", "to_spec"),
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from moelens.analysis.easy_ep import combined_importance, expert_importance
    from moelens.analysis.easy_ep import to_spec as easy_ep_spec
    from moelens.analysis.easy_ep import top_experts as easy_ep_top_experts
    from moelens.analysis.figures import coactivation_matrix, heatmap, ranked_bars, token_view, write_html
    from moelens.analysis.ftri import benjamini_hochberg, ftri_scores
    from moelens.analysis.ftri import to_spec as ftri_spec
    from moelens.analysis.ftri import top_experts as ftri_top_experts
    from moelens.analysis.npmi import npmi_combined, npmi_scores
    from moelens.analysis.npmi import to_spec as npmi_spec
    from moelens.analysis.npmi import top_experts as npmi_top_experts
    from moelens.analysis.token_filter import TokenFilter
    from moelens.analysis.super_experts import (
        DropReport,
        SuperExpertReport,
        detect_super_experts,
        profile_super_experts,
        drop_report,
        sink_decay,
    )
    from moelens.analysis.super_experts import to_spec as super_experts_spec
    from moelens.analysis.super_experts import top_experts as super_experts_top_experts
    from moelens.analysis.stats import (
        POSITION_CLASS,
        coactivation,
        expert_frequency,
        load_balance,
        routing_stability,
        token_entropy,
        transitions,
    )


__getattr__, __dir__ = lazy_attributes('moelens.analysis', globals(), _LAZY)
