"""The routing explorer (state, view), readable token text and linked heatmap clicks.

Planted stores with hand-known routing for the state's contracts; the shipped trained model
(moelens-tiny) steered by disabling an expert for the end-to-end diff, checked against pandas.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import moelens
from moelens.store import Manifest, StoreLayout, StoredTrace, write_manifest, write_shard
from moelens.widgets.explorer import OTHER_COLOR, PALETTE, RoutingExplorerState
from moelens.widgets.tokens import token_pieces

LAYERS = (1, 2)
EXPERTS = 8
WEIGHTS = (0.75, 0.25)
TRICKY = '<b>&"'  # a token whose text must be escaped exactly once: &lt;b&gt;&amp;&quot;


def write_store(
    root: Path,
    choices: dict[tuple[int, int, int], list[int]],
    tokens: list[tuple[int, int, int, str | None, bool]],
    *,
    weights: dict[tuple[int, int, int], list[float]] | None = None,
    logits: dict[tuple[int, int, int], list[float]] | None = None,
    special_token_ids: tuple[int, ...] = (),
) -> StoredTrace:
    """A store in the declared schema: ``choices`` {(prompt, position, layer): experts by rank},
    with ``weights`` {same key: weight per rank} (default 0.75, 0.25), ``tokens`` rows (prompt_id,
    position, token_id, token, generated), ``logits`` {(prompt, position, layer): one logit per expert}."""
    layout = StoreLayout(num_layers=max(LAYERS) + 1, num_experts=EXPERTS, top_k=2, max_positions=1024)
    weights = weights or {}
    routes = [
        (p, pos, layer, rank, e, weights.get((p, pos, layer), WEIGHTS)[rank])
        for (p, pos, layer), experts in choices.items() for rank, e in enumerate(experts)
    ]
    route_columns = dict(zip(["prompt_id", "position", "layer", "rank", "expert", "weight"], map(list, zip(*routes))))
    route_columns["weight"] = np.asarray(route_columns["weight"], dtype=np.float16)
    token_columns = dict(zip(["prompt_id", "position", "token_id", "token", "generated"], map(list, zip(*tokens))))
    tables = {
        "tokens": pa.Table.from_pydict(token_columns, schema=layout.tokens_schema()),
        "routes": pa.Table.from_pydict(route_columns, schema=layout.routes_schema()),
    }
    if logits is not None:
        keys = list(logits)
        tables["logits"] = pa.Table.from_pydict(
            {"prompt_id": [k[0] for k in keys], "position": [k[1] for k in keys], "layer": [k[2] for k in keys],
             "logits": [np.asarray(logits[k], dtype=np.float16) for k in keys]},
            schema=layout.logits_schema(),
        )
    root.mkdir(parents=True)
    write_shard(root, 0, tables)
    write_manifest(root, Manifest(model="planted", config_hash="0", family="planted", layout=layout, moe_layers=list(LAYERS),
                                  moelens_version="test", transformers_version="test", shards=["shard-000000"],
                                  special_token_ids=list(special_token_ids)))
    return moelens.read_trace(root)


# prompt 0: BOS, " Hello", "\n", '<b>&"', " w"; prompt 7: "x", "y"
TOKENS = [(0, 0, 0, "<|bos|>", False), (0, 1, 10, "ĠHello", False), (0, 2, 11, "Ċ", False), (0, 3, 12, TRICKY, False),
          (0, 4, 13, "Ġw", True), (7, 0, 20, "x", False), (7, 1, 21, "y", False)]
BASELINE = {
    (0, 0, 1): [0, 1], (0, 1, 1): [2, 3], (0, 2, 1): [2, 4], (0, 3, 1): [2, 5], (0, 4, 1): [6, 7],
    (0, 0, 2): [1, 0], (0, 1, 2): [1, 2], (0, 2, 2): [3, 4], (0, 3, 2): [5, 6], (0, 4, 2): [7, 0],
    (7, 0, 1): [0, 1], (7, 1, 1): [0, 1], (7, 0, 2): [0, 1], (7, 1, 2): [0, 1],
}
# steered: (0, 1, 1) and (0, 3, 2) change their expert set; (0, 2, 1) only swaps the order (no change);
# position 5 is a token only the steered run generated (unmatched, not a change)
STEERED = {**BASELINE, (0, 1, 1): [2, 6], (0, 2, 1): [4, 2], (0, 3, 2): [5, 7], (0, 5, 1): [6, 1], (0, 5, 2): [7, 1]}
STEERED_TOKENS = [*TOKENS, (0, 5, 14, "Ġz", True)]
LOGITS = {(0, position, layer): [float(e - position) for e in range(EXPERTS)] for position in range(5) for layer in LAYERS}


@pytest.fixture
def planted(tmp_path: Path) -> tuple[StoredTrace, StoredTrace]:
    baseline = write_store(tmp_path / "baseline", BASELINE, TOKENS, logits=LOGITS, special_token_ids=(0,))
    steered = write_store(tmp_path / "steered", STEERED, STEERED_TOKENS, special_token_ids=(0,))
    return baseline, steered


# --- readable token text ------------------------------------------------------------------------------
def test_byte_level_markers_are_mapped_and_a_split_character_lands_on_its_last_token():
    # "é" is the bytes C3 A9, written Ã and © in a byte-level vocabulary
    pieces = token_pieces([5, 6, 7, 8, 9], ["ĠHello", "Ċ", "ĠcafÃ", "©", "ĉx"])
    assert pieces == [" Hello", "\n", " caf", "é", "\tx"]


def test_sentencepiece_markers_and_byte_tokens_are_mapped():
    assert token_pieces([1, 2, 3, 4], ["▁Hello", "▁world", "<0x0A>", "x"]) == [" Hello", " world", "\n", "x"]


def test_special_and_unknown_tokens_keep_a_visible_label():
    assert token_pieces([0, 5, 9], ["<|bos|>", "Ġhi", None], special_ids={0}) == ["<|bos|>", " hi", "⟨9⟩"]
    with pytest.raises(ValueError, match="2 token ids but 1 token strings"):
        token_pieces([1, 2], ["a"])


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return moelens.load("moelens-tiny")


def test_pieces_decoded_by_the_tokenizer_and_mapped_without_it_agree(tiny):
    _, tokenizer = tiny
    text = "def café(x):\n    return x  # ok"
    ids = tokenizer(text)["input_ids"]
    strings = tokenizer.convert_ids_to_tokens(ids)
    decoded = token_pieces(ids, strings, tokenizer=tokenizer)
    assert decoded[0] == "<|bos|>" and "".join(decoded[1:]) == tokenizer.decode(ids, skip_special_tokens=True)
    assert token_pieces(ids, strings, special_ids=tokenizer.all_special_ids) == decoded
    assert not any(marker in piece for piece in decoded for marker in "ĠĊ▁")


# --- the state on planted stores ------------------------------------------------------------------------
def test_tokens_decisions_and_router_probabilities(planted):
    baseline, _ = planted
    state = RoutingExplorerState(baseline)
    assert state.prompt_ids == [0, 7] and state.layers == [1, 2] and (state.prompt_id, state.layer) == (0, 1)
    assert [t.text for t in state.tokens] == ["<|bos|>", " Hello", "\n", TRICKY, " w"]
    assert [t.special for t in state.tokens] == [True, False, False, False, False]
    assert state.tokens[4].generated and not state.tokens[3].generated
    decisions = state.decisions(3)
    assert [d.layer for d in decisions] == [1, 2]
    assert [(c.expert, c.weight) for c in decisions[1].choices] == [(5, 0.75), (6, 0.25)]
    logits = np.arange(EXPERTS, dtype=np.float64) - 3
    softmax = np.exp(logits) / np.exp(logits).sum()
    assert [c.probability for c in decisions[0].choices] == pytest.approx([softmax[2], softmax[5]], rel=1e-3)
    assert decisions[0].other is None and not decisions[0].changed
    assert state.describe(3).splitlines() == [
        "position 3: '<b>&\"' (id 12)",
        f"L1: e2 w0.75 p{softmax[2]:.2f}, e5 w0.25 p{softmax[5]:.2f}",
        f"L2: e5 w0.75 p{softmax[5]:.2f}, e6 w0.25 p{softmax[6]:.2f}",
    ]


def test_the_diff_marks_exactly_the_changed_expert_sets(planted):
    state = RoutingExplorerState(*planted)
    assert state.changes() == {(1, 1), (3, 2)}  # an order swap is no change; position 5 is unmatched
    assert [(c.layer, c.matched, c.changed) for c in state.layer_changes()] == [(1, 5, 1), (2, 5, 1)]
    assert state.layer_changes()[0].fraction == pytest.approx(0.2)
    aligned = state.aligned()
    assert [a.position for a in aligned] == [0, 1, 2, 3, 4, 5]
    assert [a.changed_layers for a in aligned] == [(), (1,), (), (2,), (), ()]
    assert aligned[5].token is None and aligned[5].other.text == " z" and aligned[5].differs
    assert not aligned[1].differs
    assert "(changed)" in state.describe(1).splitlines()[1] and "(changed)" not in state.describe(2)
    state.select(prompt_id=7)
    assert state.changes() == set() and [c.fraction for c in state.layer_changes()] == [0.0, 0.0]


def test_colors_are_categorical_by_first_choice_and_shared_by_both_traces(planted):
    state = RoutingExplorerState(*planted)
    # rank-0 experts at layer 1, both traces: 0, 2, 2, 2, 6 and 0, 2, 4, 2, 6, 6 -> 2 (5x), 6 (3x), 0 (2x), 4 (1x)
    assert state.colors() == {2: PALETTE[0], 6: PALETTE[1], 0: PALETTE[2], 4: PALETTE[3]}
    assert len(set(PALETTE)) == len(PALETTE) > 10 and OTHER_COLOR not in PALETTE


def test_bad_selections_say_what_exists(planted):
    baseline, _ = planted
    state = RoutingExplorerState(baseline)
    seen = []
    state.observe(lambda s: seen.append((s.prompt_id, s.layer)))
    with pytest.raises(ValueError, match=r"prompt 3 is not in the trace; prompt ids in the trace: 0, 7"):
        state.select(prompt_id=3)
    with pytest.raises(ValueError, match=r"layer 0 is not an MoE layer of the trace; MoE layers are \[1, 2\]"):
        state.select(layer=0)
    with pytest.raises(ValueError, match="needs a second trace"):
        state.changes()
    state.select(prompt_id=7, layer=2)
    state.select(layer=2)  # no change, no call
    assert seen == [(7, 2)]
    with pytest.raises(ValueError, match="no token at position 9"):
        state.describe(9)


# --- the view -----------------------------------------------------------------------------------------------
def test_the_view_escapes_token_text_once_and_outlines_changed_decisions(planted):
    from moelens.widgets.explorer_view import RoutingExplorer

    single = RoutingExplorer(planted[0])
    assert "moelens-explorer" in single._dom_classes
    page = single.view.value
    assert "&lt;b&gt;&amp;&quot;" in page and TRICKY not in page and "&amp;lt;" not in page
    assert page.count("class='moelens-token'") == 5 and "moelens-token-changed" not in page
    assert "\n</span>" in page  # the newline token is a real newline in the flow

    explorer = RoutingExplorer(*planted)
    page = explorer.view.value
    assert "&lt;b&gt;&amp;&quot;" in page and TRICKY not in page
    # layer 1: position 1 changed, shown on both sides
    assert page.count("moelens-token moelens-token-changed") == 2 and page.count("moelens-changed-bar") == 2
    assert "1/5 (20%)" in page
    explorer.layer.value = 2  # the picker drives the state ...
    assert explorer.state.layer == 2 and "moelens-token-changed" in explorer.view.value
    explorer.state.select(prompt_id=7)  # ... and a change from code redraws the view
    assert explorer.prompt.value == 7 and "moelens-token-changed" not in explorer.view.value


# --- end to end: the shipped model, steered ---------------------------------------------------------------
def expert_sets(trace) -> pd.Series:
    routes = trace.routes.astype({"position": "int64", "layer": "int64", "expert": "int64"})
    return routes.groupby(["prompt_id", "position", "layer"])["expert"].agg(frozenset)


def test_explorer_diff_of_a_disabled_expert_on_the_trained_model(tiny):
    model, tokenizer = tiny
    prompt = "def add(a, b):\n    return a + b"
    baseline = moelens.trace(model, prompts=[prompt], tokenizer=tokenizer, max_new_tokens=4, full_logits=True)
    layer = 1
    expert = int(baseline.routes.query("layer == @layer")["expert"].value_counts().idxmax())
    with moelens.intervene(model, moelens.interventions.disable({layer: [expert]})):
        steered = moelens.trace(model, prompts=[prompt], tokenizer=tokenizer, max_new_tokens=4)
    assert not steered.routes.query("layer == @layer and expert == @expert").shape[0]

    before, after = expert_sets(baseline), expert_sets(steered)
    both = before.index.intersection(after.index)
    assert len(both) > 0
    expected = {(position, layer) for (_, position, layer) in both[(before[both] != after[both]).to_numpy()]}
    state = RoutingExplorerState(baseline, steered, tokenizer=tokenizer)
    assert state.changes() == expected and any(changed_layer == layer for _, changed_layer in expected)
    layer_changes = state.layer_changes()
    assert [change.layer for change in layer_changes] == list(baseline.layers)
    for change in layer_changes:
        in_layer = [key for key in both if key[2] == change.layer]
        assert change.matched == len(in_layer)
        assert change.changed == sum(1 for key in in_layer if (key[1], key[2]) in expected)
    assert "".join(t.text for t in state.tokens if not t.special).startswith(prompt)
    row = baseline.logits.iloc[5]  # router probabilities: the softmax of the traced logits
    logits = np.asarray(row["logits"], dtype=np.float64)
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    choices = state.decision(int(row["position"]), int(row["layer"])).choices
    assert choices and [c.probability for c in choices] == pytest.approx([softmax[c.expert] for c in choices])


# --- linked heatmap clicks ------------------------------------------------------------------------------------
def test_heatmap_clicks_map_to_layer_and_expert_by_the_axis_labels():
    from plotly.callbacks import Points

    from moelens.analysis import heatmap
    from moelens.widgets.links import linked_heatmap

    cells = [(1, 0), (1, 5), (3, 2), (3, 5)]  # sparse ids: labels, not indices, name the cells
    table = pd.DataFrame({"layer": [c[0] for c in cells], "expert": [c[1] for c in cells], "share": [0.1, 0.2, 0.3, 0.4]})
    figure = heatmap(table, "share")
    clicked: list[tuple[int, int]] = []
    widget = linked_heatmap(figure, lambda layer, expert: clicked.append((layer, expert)))
    trace = widget.data[0]
    assert list(trace.y) == ["1", "3"] and list(trace.x) == ["0", "2", "5"]
    handlers = trace._click_callbacks
    assert handlers
    expected = []
    for row, layer_label in enumerate(trace.y):
        for column, expert_label in enumerate(trace.x):
            points = Points(point_inds=[[row, column]], xs=[expert_label], ys=[layer_label], trace_name="share", trace_index=0)
            for handler in handlers:
                handler(trace, points, None)
            expected.append((int(layer_label), int(expert_label)))
    assert clicked == expected
    for handler in handlers:  # plotly also calls the handlers of traces that were not clicked, with no points
        handler(trace, Points(point_inds=[], xs=[], ys=[], trace_name="share", trace_index=0), None)
    assert len(clicked) == len(expected)

    figure.update_layout(xaxis_title="layer", yaxis_title="expert")  # a transposed figure is read by its titles
    transposed = linked_heatmap(figure, lambda layer, expert: clicked.append((layer, expert)))
    assert transposed.data[0]._click_callbacks
    for handler in transposed.data[0]._click_callbacks:
        handler(transposed.data[0], Points(point_inds=[[0, 0]], xs=["L3"], ys=["E5"], trace_name="share", trace_index=0), None)
    assert clicked[-1] == (3, 5)


def test_a_figure_without_a_heatmap_is_refused():
    import plotly.graph_objects as go

    from moelens.widgets.links import linked_heatmap

    with pytest.raises(ValueError, match=r"needs a figure with a heatmap trace; this one has \['bar'\]"):
        linked_heatmap(go.Figure(go.Bar(x=[1], y=[2])), lambda layer, expert: None)


def test_the_changed_fraction_of_a_layer_without_matches_is_nan():
    from moelens.widgets.explorer import LayerChange

    assert math.isnan(LayerChange(1, 0, 0).fraction) and LayerChange(1, 4, 1).fraction == 0.25
