"""The steering grid: its pure-Python state (modes, spec, validation, undo, compare) and a view smoke test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moelens.interventions import Drop, Intervention, SpecError, disable, force, reweight, top_p
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
        (disable({1: [0]}, mode=Drop(renormalize=True)), "renormalised"),
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


def test_problem_binds_again_only_when_the_spec_changes(qwen, monkeypatch):
    import moelens.interventions.apply as apply

    model, _ = qwen
    calls = []
    monkeypatch.setattr(apply, "bind", lambda model, spec: calls.append(spec))
    grid = ExpertGridState.from_model(model)
    layer = min(grid.layers)
    assert grid.problem(model) is None and grid.problem(model) is None
    assert len(calls) == 1
    grid.set(layer, 0, "disabled")
    grid.problem(model)
    grid.problem(model)
    assert calls == [Intervention(), grid.to_spec()]


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
    from moelens.widgets.view import COLORS

    model, tokenizer = qwen
    view = ExpertGrid(model, tokenizer)
    (layer, expert), button = next(iter(view.cells.items()))
    view.mode.value = "boosted"
    button.click()
    assert view.state.mode(layer, expert) == "boosted"
    assert button.style.button_color == COLORS["boosted"]
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
    view._worker and view._worker.join()
    assert [c.prompt for c in view.comparisons] == ["The quick brown fox", "Bonjour"]
    assert "The quick brown fox" in view.comparison.value and not view.busy
    assert not view.generate_button.disabled and view.cancel_button.disabled


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


# --- grid v2: observable state, selection, shading, streaming, cancel, reference scores -------------


@pytest.fixture(scope="module")
def shipped():
    import moelens

    return moelens.load("moelens-tiny")


def test_observers_hear_every_change_and_can_stop(grid):
    heard = []
    stop = grid.observe(lambda state: heard.append(state.summary()))
    grid.set(1, 2, "disabled")
    grid.set(1, 2, "disabled")  # no change: no call
    grid.configure(scope="prompt")
    grid.select([(3, 4)])
    grid.undo()
    assert len(heard) == 4 and heard[0].startswith("disabled (reroute) L1: 2")
    stop()
    grid.clear()
    assert len(heard) == 4


def test_selection_is_sent_to_the_grid_in_one_undo_step(grid):
    with pytest.raises(ValueError, match="nothing is selected"):
        grid.mark_selection("disabled")
    grid.select([(1, 3)])
    grid.select([(3, 5), (1, 3)], add=True)
    assert grid.selection == ((1, 3), (3, 5))
    grid.mark_selection("forced")
    assert grid.experts("forced") == {1: [3], 3: [5]}
    grid.undo()
    assert grid.experts("forced") == {}
    with pytest.raises(ValueError, match="expert 9 is out of range"):
        grid.select([(1, 9)])


def test_cell_scores_shade_by_sign_and_size():
    import pandas as pd

    from moelens.widgets.state import CellScores, text_color

    table = pd.DataFrame({"layer": [1, 1, 3, 3], "expert": [0, 1, 0, 1], "difference": [0.5, -0.25, 0.0, float("nan")]})
    scores = CellScores.from_table(table, "difference")
    assert scores.signed and scores.limit == 0.5 and (3, 1) not in scores.values
    assert scores.color(1, 0) == "rgb(178, 24, 43)"  # the largest positive score: the red end
    assert scores.color(1, 1) == "rgb(144, 178, 214)"  # half way from white to the blue end (33, 102, 172): 144, 178.5 -> 178 (half to even), 213.5 -> 214
    assert scores.color(3, 0) == "rgb(255, 255, 255)" and scores.color(3, 1) is None
    assert text_color("rgb(178, 24, 43)") == "white" and text_color("rgb(255, 255, 255)") == "black"
    load = CellScores.from_table(table.assign(share=[0.2, 0.1, 0.4, 0.3]), "share")
    assert not load.signed and load.color(3, 0) == "rgb(8, 48, 107)"
    with pytest.raises(ValueError, match="several rows per"):
        CellScores.from_table(pd.concat([table, table]), "difference")
    with pytest.raises(ValueError, match="lacks the columns"):
        CellScores.from_table(table, "npmi")


def test_shading_outside_the_grid_is_refused(grid):
    from moelens.widgets.state import CellScores

    with pytest.raises(ValueError, match="layer 2 is not an MoE layer"):
        grid.shade(CellScores("x", {(2, 0): 1.0}, signed=False))


def test_token_diff_marks_what_differs_on_each_side():
    from moelens.widgets.state import token_diff

    baseline, steered = token_diff(["a", " b", " c", " d"], ["a", " x", " c", " d", " e"])
    assert baseline == [("a", False), (" b", True), (" c", False), (" d", False)]
    assert steered == [("a", False), (" x", True), (" c", False), (" d", False), (" e", True)]
    assert token_diff([], ["z"]) == ([], [("z", True)])


def test_decoded_pieces_join_to_the_decoded_text_without_markers(shipped):
    from moelens.widgets.tokens import decoded_pieces

    _, tokenizer = shipped
    text = 'def f(x):\n    return "<b>" + x'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = decoded_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) > 5
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(marker in piece for piece in pieces for marker in ("Ġ", "Ċ"))


def test_streamed_pieces_end_as_the_final_continuations(shipped):
    model, tokenizer = shipped
    grid = ExpertGridState.from_model(model)
    grid.set(min(grid.layers), 0, "disabled")
    events = []
    results = grid.compare(model, tokenizer, ["def add(a, b):", "x = 1"], max_new_tokens=5, on_progress=events.append)
    assert len(results) == 2 and events
    last = {(e.prompt_index, e.run): e.pieces for e in events}
    assert set(last) == {(0, "baseline"), (0, "steered"), (1, "baseline"), (1, "steered")}
    for index, result in enumerate(results):
        assert last[(index, "baseline")] == result.baseline_pieces and last[(index, "steered")] == result.steered_pieces
    lengths = [len(e.pieces) for e in events if (e.prompt_index, e.run) == (0, "baseline")]
    assert lengths == list(range(1, len(lengths) + 1))  # one report per new token


def test_cancel_returns_the_prompts_finished_so_far(shipped):
    model, tokenizer = shipped
    grid = ExpertGridState.from_model(model)
    events = []
    results = grid.compare(
        model, tokenizer, ["a = 1", "b = 2", "c = 3"], max_new_tokens=4, on_progress=events.append, cancelled=lambda: any(e.prompt_index == 1 for e in events)
    )
    assert [r.prompt for r in results] == ["a = 1"]
    # the stopping criterion runs once per step: generation ends within one token of the cancel
    assert max(len(e.pieces) for e in events if e.prompt_index == 1) <= 2
    assert not any(e.prompt_index == 2 for e in events)


def _full_forward_logprob(model, tokenizer, prompt, continuation):
    """Ground truth: one forward pass over prompt + continuation, no cache."""
    import torch

    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    target = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.cat([prompt_ids, target], dim=1)).logits[0].float(), dim=-1)
    start = prompt_ids.shape[1] - 1
    return sum(float(log_probs[start + i, target[0, i]]) for i in range(target.shape[1])), prompt_ids.shape[1], target.shape[1]


def test_reference_logprob_matches_a_full_forward_pass(shipped):
    import moelens
    from moelens.evaluation import continuation_logprob
    from moelens.interventions import disable

    model, tokenizer = shipped
    prompt, reference = "def add(a, b):", "\n    return a + b"
    expected, prompt_length, count = _full_forward_logprob(model, tokenizer, prompt, reference)
    total, tokens = continuation_logprob(model, tokenizer, prompt, reference)
    assert tokens == count > 3 and total == pytest.approx(expected, abs=1e-4)

    layer = min(ExpertGridState.from_model(model).layers)
    experts = {layer: [0, 1, 2, 3]}
    with moelens.intervene(model, disable(experts)):
        steered_all, _ = continuation_logprob(model, tokenizer, prompt, reference)
        expected_all, *_ = _full_forward_logprob(model, tokenizer, prompt, reference)
    assert steered_all == pytest.approx(expected_all, abs=1e-4) and abs(steered_all - total) > 1e-3
    # "generated" steers exactly the continuation's tokens: the same as naming their positions in one pass
    with moelens.intervene(model, disable(experts, tokens="generated")):
        steered_generated, _ = continuation_logprob(model, tokenizer, prompt, reference)
    positions = list(range(prompt_length, prompt_length + count))
    with moelens.intervene(model, disable(experts, tokens=positions)):
        expected_generated, *_ = _full_forward_logprob(model, tokenizer, prompt, reference)
    assert steered_generated == pytest.approx(expected_generated, abs=1e-4)
    assert abs(steered_generated - steered_all) > 1e-3


def test_compare_scores_references_and_the_generated_scope_spares_the_prompt(shipped):
    model, tokenizer = shipped
    grid = ExpertGridState.from_model(model)
    grid.configure(scope="generated")
    grid.mark({layer: [0, 1, 2, 3] for layer in grid.layers}, "disabled")
    (result,) = grid.compare(model, tokenizer, ["def add(a, b):"], max_new_tokens=6, references=["\n    return a + b"])
    assert result.baseline_reference is not None and result.steered_reference is not None
    assert result.baseline_reference.tokens == result.steered_reference.tokens > 3
    assert result.baseline_reference.logprob != result.steered_reference.logprob
    prompt_length = len(tokenizer("def add(a, b):")["input_ids"])
    keys = ["position", "layer", "rank"]
    baseline = result.baseline_trace.routes.set_index(keys)["expert"]
    steered = result.steered_trace.routes.set_index(keys)["expert"]
    in_prompt = baseline.index.get_level_values("position") < prompt_length
    assert in_prompt.any() and (baseline[in_prompt] == steered.reindex(baseline.index)[in_prompt]).all()
    generated = steered[steered.index.get_level_values("position") >= prompt_length]
    assert not generated.empty and not generated.isin([0, 1, 2, 3]).any()


def test_view_redraws_when_the_state_changes_from_code(shipped):
    pytest.importorskip("ipywidgets")
    from moelens.widgets import ExpertGrid
    from moelens.widgets.view import COLORS

    model, tokenizer = shipped
    view = ExpertGrid(model, tokenizer)
    layer = min(view.state.layers)
    view.state.set(layer, 3, "forced")
    assert view.cells[(layer, 3)].style.button_color == COLORS["forced"]
    assert "forced" in view.status.value and '"force"' in view.spec_view.value
    view.state.configure(scope="generated")
    assert view.scope.value == "generated"
    other = ExpertGridState.from_model(model)
    other.set(layer, 5, "disabled")
    view.state = other
    assert view.cells[(layer, 5)].style.button_color == COLORS["disabled"]
    assert view.cells[(layer, 3)].style.button_color == COLORS["on"]
    other.set(layer, 6, "boosted")  # the view follows the new state
    assert view.cells[(layer, 6)].style.button_color == COLORS["boosted"]


def test_view_select_brush_shading_legend_and_card(shipped):
    pytest.importorskip("ipywidgets")
    import pandas as pd

    from moelens.widgets import ExpertGrid

    model, tokenizer = shipped
    layer = min(ExpertGridState.from_model(model).layers)
    ftri = pd.DataFrame({"layer": [layer, layer], "expert": [2, 7], "difference": [0.4, -0.1]})
    view = ExpertGrid(model, tokenizer, ftri_tables={"code": ftri}, card=lambda layer, expert: f"<b>card L{layer} E{expert}</b>")
    view.mode.value = "select"
    view.cells[(layer, 7)].click()
    assert view.state.selection == ((layer, 7),) and view.state.mode(layer, 7) == "on"
    assert view.card_view.value == f"<b>card L{layer} E7</b>" and "solid" in view.cells[(layer, 7)].layout.border
    view.shading.value = "fTRI difference: code"
    assert view.cells[(layer, 2)].style.button_color == "rgb(178, 24, 43)"
    assert "fTRI difference: code" in view.legend.value
    view.selection_buttons["disabled"].click()
    assert view.state.experts("disabled") == {layer: [7]}


def test_view_shows_generation_errors_in_the_widget(shipped, monkeypatch):
    pytest.importorskip("ipywidgets")
    from moelens.widgets import ExpertGrid

    model, tokenizer = shipped
    view = ExpertGrid(model, tokenizer, prompts="x = 1")

    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over <here>")

    monkeypatch.setattr(view.state, "compare", broken)
    view.generate().join()
    assert "RuntimeError: the model fell over &lt;here&gt;" in view.status.value
    assert not view.busy and not view.generate_button.disabled and view.cancel_button.disabled
    view.prompts.value = ""
    assert view.generate() is None and "write at least one prompt" in view.status.value
    view.prompts.value = "x = 1"
    monkeypatch.undo()
    view.generate().join()
    assert "write at least one prompt" not in view.status.value and view.comparisons


def test_comparison_table_highlights_changes_and_keeps_whitespace():
    from moelens.widgets.state import PromptComparison, ReferenceScore
    from moelens.widgets.view import comparison_table

    pytest.importorskip("ipywidgets")
    comparison = PromptComparison(
        'say "<hi>"', ("\n", "  a", " b"), ("\n", "  a", " c"), 0.25, 8, None, None,
        "ref", ReferenceScore(-4.0, 2), ReferenceScore(-6.5, 2),
    )
    table = comparison_table([comparison], "summary")
    assert "say &quot;&lt;hi&gt;&quot;" in table and "&amp;" not in table
    assert table.count("moelens-changed") == 2 and "white-space:pre-wrap" in table
    assert "-4.00 → -6.50 (-2.50) over 2 tokens" in table and "25% of 8" in table


def test_spec_view_round_trips_to_the_grid_spec(grid):
    pytest.importorskip("ipywidgets")
    import base64
    import re

    from moelens.widgets.view import spec_html

    grid.set(1, 2, "disabled")
    grid.set(3, 1, "boosted")
    encoded = re.search(r"base64,([^']+)'", spec_html(grid)).group(1)
    assert Intervention.from_json(base64.b64decode(encoded).decode()) == grid.to_spec()


def test_compare_hands_over_each_result_as_soon_as_it_is_complete(shipped):
    model, tokenizer = shipped
    grid = ExpertGridState.from_model(model)
    handed, seen_while_streaming = [], []

    def progress(event):
        seen_while_streaming.append((event.prompt_index, len(handed)))

    results = grid.compare(model, tokenizer, ["a = 1", "b = 2"], max_new_tokens=2, on_progress=progress, on_result=handed.append)
    assert handed == results and len(results) == 2
    assert (1, 1) in seen_while_streaming  # prompt 2 streamed while prompt 1's result was already out


def test_token_pieces_of_a_trace_without_token_strings():
    from moelens.widgets.tokens import token_pieces

    # a null token string reaches pandas as None or as NaN (DuckDB)
    assert token_pieces([5, 6], [None, float("nan")]) == ["⟨5⟩", "⟨6⟩"]
