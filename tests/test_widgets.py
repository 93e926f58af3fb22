"""The steering grid: its pure-Python state (modes, spec, validation, undo, compare) and a view smoke test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moelens.interventions import Intervention, SpecError, disable, force, reweight, top_p
from moelens.widgets.state import ExpertGridState, GridLayer, Options

LAYERS = [GridLayer(index=1, num_experts=8, top_k=2), GridLayer(index=3, num_experts=8, top_k=2)]


@pytest.fixture
def grid() -> ExpertGridState:
    return ExpertGridState(LAYERS)


@pytest.fixture(scope="module")
def qwen():
    import moelens

    return moelens.load("tiny:qwen3_moe")


def test_importing_widgets_loads_neither_ipywidgets_nor_torch():
    code = "import sys, moelens.widgets, moelens.widgets.state; print(sorted({'torch', 'ipywidgets'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_toggle_cycles_through_the_modes(grid):
    assert grid.mode(1, 4) == "on"
    assert [grid.toggle(1, 4) for _ in range(4)] == ["disabled", "forced", "boosted", "on"]


def test_toggle_with_a_mode_paints_and_unpaints(grid):
    assert grid.toggle(3, 0, "forced") == "forced"
    assert grid.toggle(3, 0, "forced") == "on"
    assert grid.toggle(3, 0, "boosted") == "boosted"


def test_to_spec_combines_disable_force_and_reweight(grid):
    grid.configure(disable_mode="drop", boost_factor=8.0, scope="generated")
    grid.set(1, 5, "disabled")
    grid.set(1, 2, "disabled")
    grid.set(3, 0, "forced")
    grid.set(3, 7, "boosted")
    expected = (
        disable({1: [2, 5]}, mode="drop", tokens="generated") + force({3: [0]}, tokens="generated") + reweight({3: [7]}, 8.0, tokens="generated")
    )
    assert grid.to_spec() == expected
    assert grid.summary() == "disabled (drop) L1: 2, 5 | forced L3: 0 | boosted x8 L3: 7 | tokens: generated"


def test_empty_grid_is_the_empty_spec(grid):
    assert grid.to_spec() == Intervention()
    assert "baseline" in grid.summary()


def test_json_round_trip_through_the_spec(grid):
    grid.configure(boost_factor=0.5, scope="prompt")
    grid.mark({1: [0, 1], 3: [6]}, "disabled")
    grid.set(3, 2, "boosted")
    restored = ExpertGridState.from_spec(Intervention.from_json(grid.to_spec().to_json()), LAYERS)
    assert restored.to_spec() == grid.to_spec()
    assert restored.options == grid.options
    assert restored.undo() is False  # a grid built from a spec starts with no history


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (top_p(0.5), "'top_p' part"),
        (disable({1: [0]}, mode="drop", renormalize=True), "renormalised"),
        (disable({1: [0]}, tokens=[0, 1]), "positions"),
        (reweight({1: [0]}, 2.0) + reweight({3: [0]}, 3.0), "boost_factor"),
        (disable({9: [0]}), "layer 9 is not an MoE layer"),
        (force({1: [8]}), "expert 8 is out of range in layer 1: experts are 0-7"),
    ],
    ids=["other-kind", "renormalize", "positions", "two-factors", "unknown-layer", "expert-out-of-range"],
)
def test_specs_the_grid_cannot_show_are_refused(grid, spec, message):
    with pytest.raises(ValueError, match=message):
        grid.apply_spec(spec)
    assert grid.to_spec() == Intervention()  # nothing half-applied


@pytest.mark.parametrize(
    ("options", "message"),
    [({"boost_factor": 0.0}, "factor must be a finite number > 0"), ({"scope": "decode"}, "scope 'decode'"),
     ({"disable_mode": "zero"}, "mode='zero'"), ({"colour": "red"}, "unknown option")],
    ids=["zero-factor", "bad-scope", "bad-disable-mode", "unknown-option"],
)
def test_bad_options_are_refused_with_a_message(grid, options, message):
    with pytest.raises(ValueError, match=message):
        grid.configure(**options)


def test_bad_cells_and_modes_are_refused(grid):
    with pytest.raises(ValueError, match="MoE layers are \\[1, 3\\]"):
        grid.set(2, 0, "disabled")
    with pytest.raises(ValueError, match="use one of on, disabled, forced, boosted"):
        grid.set(1, 0, "off")


def test_undo_reverts_changes_in_order(grid):
    grid.set(1, 1, "disabled")
    grid.configure(boost_factor=2.0)
    grid.set(1, 1, "disabled")  # no change: not recorded
    grid.clear()
    assert grid.to_spec() == Intervention()
    assert grid.undo() and grid.mode(1, 1) == "disabled"
    assert grid.undo() and grid.options == Options()
    assert grid.undo() and grid.mode(1, 1) == "on"
    assert grid.undo() is False


def test_validation_reuses_the_binding_messages(qwen):
    model, _ = qwen
    grid = ExpertGridState.from_model(model)
    layer = min(grid.layers)
    top_k, num_experts = grid.layers[layer].top_k, grid.layers[layer].num_experts
    assert grid.problem(model) is None
    grid.mark({layer: range(top_k + 1)}, "forced")
    assert f"experts forced in layer {layer}, but only top-k = {top_k} slots" in grid.problem(model)
    grid.mark({layer: range(num_experts)}, "disabled")
    with pytest.raises(SpecError, match=f"leaves 0 of {num_experts} experts"):
        grid.validate(model)


def test_compare_steers_away_from_a_disabled_expert(qwen):
    import torch

    model, tokenizer = qwen
    prompt = "The quick brown fox"
    grid = ExpertGridState.from_model(model)
    baseline_only = grid.compare(model, tokenizer, [prompt], max_new_tokens=4)[0]
    assert baseline_only.baseline == baseline_only.steered and baseline_only.routing_changed == 0.0

    layer = min(grid.layers)
    used = baseline_only.baseline_trace.routes.query("layer == @layer")["expert"].value_counts().index[0]
    grid.set(layer, int(used), "disabled")
    (result,) = grid.compare(model, tokenizer, [prompt], max_new_tokens=4)
    assert not result.steered_trace.routes.query("layer == @layer")["expert"].eq(used).any()
    assert 0 < result.routing_changed <= 1 and result.routing_events > 0

    batch = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert result.baseline == tokenizer.decode(plain[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def test_view_clicks_change_the_state(qwen):
    pytest.importorskip("ipywidgets")
    from moelens.widgets import ExpertGrid

    model, tokenizer = qwen
    view = ExpertGrid(model, tokenizer)
    (layer, expert), button = next(iter(view.cells.items()))
    view.mode.value = "boosted"
    button.click()
    assert view.state.mode(layer, expert) == "boosted"
    assert button.style.button_color == "#f0ad4e"
    view.undo_button.click()
    assert view.state.mode(layer, expert) == "on"
    view.factor.value = 2.0
    assert view.state.options.boost_factor == 2.0


def test_view_generate_shows_both_continuations(qwen):
    pytest.importorskip("ipywidgets")
    from moelens.widgets import ExpertGrid

    model, tokenizer = qwen
    view = ExpertGrid(model, tokenizer, prompts="The quick brown fox\n\nBonjour")
    view.max_new_tokens.value = 2
    view.cells[next(iter(view.cells))].click()
    view.generate_button.click()
    assert [c.prompt for c in view.comparisons] == ["The quick brown fox", "Bonjour"]


def test_view_blocks_generation_for_an_invalid_grid(qwen):
    pytest.importorskip("ipywidgets")
    from moelens.widgets import ExpertGrid

    model, tokenizer = qwen
    view = ExpertGrid(model, tokenizer)
    layer = min(view.state.layers)
    view.mode.value = "forced"
    for expert in range(view.state.layers[layer].top_k + 1):
        view.cells[(layer, expert)].click()
    assert view.generate_button.disabled and "slots exist" in view.status.value


def test_view_marks_the_top_ftri_experts(qwen):
    pytest.importorskip("ipywidgets")
    import pandas as pd

    from moelens.widgets import ExpertGrid

    model, tokenizer = qwen
    layer = min(ExpertGridState.from_model(model).layers)
    # an fTRI table's ranking columns; expert 9 is used LESS by the domain
    ranked = pd.DataFrame({"layer": [layer, layer, layer], "expert": [5, 1, 9], "difference": [0.3, 0.1, -0.2]})
    view = ExpertGrid(model, tokenizer, ftri_tables={"python": ranked})
    view.ftri_count.value = 2
    view.ftri_button.click()
    assert view.state.experts("disabled") == {layer: [1, 5]}
    view.state.clear()
    view.ftri_count.value = 3  # more than the domain over-uses: 9 stays on
    view.ftri_button.click()
    assert view.state.experts("disabled") == {layer: [1, 5]}
