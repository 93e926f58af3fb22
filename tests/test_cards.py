"""Expert cards against hand computation on a planted store: load, top contexts, fTRI/nPMI rows, HTML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moelens.analysis import TokenFilter
from moelens.store import StoredTrace
from moelens.widgets.cards import card_html, expert_card
from tests.test_explorer import TRICKY, write_store

# layer 1, expert 2 is the card's subject. Prompt 0: BOS (special), " The", " cat", '<b>&"', "\n", " sat", "." (generated);
# prompt 1: "x", "y", "z", "w" (generated). (0, 5) has one filled slot (an intervention left the other empty); expert 7 is never chosen.
TOKENS = [(0, 0, 0, "<|bos|>", False), (0, 1, 11, "ĠThe", False), (0, 2, 12, "Ġcat", False), (0, 3, 13, TRICKY, False),
          (0, 4, 14, "Ċ", False), (0, 5, 15, "Ġsat", False), (0, 6, 16, ".", True),
          (1, 0, 21, "x", False), (1, 1, 22, "y", False), (1, 2, 23, "z", False), (1, 3, 24, "w", True)]
ROUTES = {
    (0, 0, 1): ([2, 1], [0.9, 0.1]), (0, 1, 1): ([2, 3], [0.6, 0.4]), (0, 2, 1): ([4, 2], [0.7, 0.3]),
    (0, 3, 1): ([2, 5], [0.8, 0.2]), (0, 4, 1): ([1, 3], [0.5, 0.5]), (0, 5, 1): ([2], [0.6]), (0, 6, 1): ([5, 6], [0.5, 0.5]),
    (1, 0, 1): ([2, 6], [0.55, 0.45]), (1, 1, 1): ([6, 5], [0.5, 0.5]), (1, 2, 1): ([3, 2], [0.4, 0.6]), (1, 3, 1): ([2, 0], [0.5, 0.5]),
}


@pytest.fixture
def store(tmp_path: Path) -> StoredTrace:
    choices = {key: experts for key, (experts, _) in ROUTES.items()}
    weights = {key: w for key, (_, w) in ROUTES.items()}
    return write_store(tmp_path / "store", choices, TOKENS, weights=weights, special_token_ids=(0,))


def half(value: float) -> float:
    """The weight as the store keeps it (float16)."""
    return float(np.float16(value))


def test_load_is_counted_by_hand(store):
    card = expert_card(store, 1, 2)
    # counted tokens: all but BOS (special) -> prompt 0 positions 1-6 and prompt 1 positions 0-3
    assert (card.tokens, card.slots, card.selections) == (10, 19, 7)
    assert card.share == pytest.approx(7 / 19) and card.frequency == pytest.approx(7 / 10)
    chosen = [0.6, 0.3, 0.8, 0.6, 0.55, 0.6, 0.5]
    assert card.mean_weight == pytest.approx(sum(map(half, chosen)) / 7)
    assert card.counted["special"] == "excluded (ids [0])"

    prompt_only = expert_card(store, 1, 2, tokens=TokenFilter(kind="prompt"))  # without (0, 6) and (1, 3)
    assert (prompt_only.tokens, prompt_only.slots, prompt_only.selections) == (8, 15, 6)
    never = expert_card(store, 1, 7)
    assert never.selections == 0 and never.mean_weight is None and never.contexts == () and never.share == 0


def test_top_contexts_are_ordered_by_weight_then_rank_then_position(store):
    card = expert_card(store, 1, 2, contexts=5, window=2)
    assert [(c.prompt_id, c.position, c.rank) for c in card.contexts] == [(0, 3, 0), (0, 1, 0), (0, 5, 0), (1, 2, 1), (1, 0, 0)]
    assert [c.weight for c in card.contexts] == [half(0.8), half(0.6), half(0.6), half(0.6), half(0.55)]
    first = card.contexts[0]
    assert (first.before, first.token, first.after) == ((" The", " cat"), TRICKY, ("\n", " sat"))
    assert card.contexts[1].before == ("<|bos|>",)  # the window shows every token, counted or not
    assert card.contexts[3].after == ("w",)  # the prompt ends one token later

    with_special = expert_card(store, 1, 2, contexts=1, tokens=TokenFilter(special=True))
    assert [(c.position, c.weight) for c in with_special.contexts] == [(0, half(0.9))] and with_special.selections == 8


def ftri_table(rows: list[tuple[int, int, float]]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=["layer", "expert", "difference"])
    table = table.sort_values("difference", ascending=False).reset_index(drop=True)
    table.insert(0, "place", range(1, len(table) + 1))
    table["target_rate"], table["reference_rate"], table["q_value"] = 0.5, 0.5 - table["difference"], 0.01
    return table


def test_contrasts_and_markers_are_the_experts_rows_best_first(store):
    ftri = {
        "code": ftri_table([(1, 2, 0.1), (1, 3, 0.4)]),
        "math": ftri_table([(1, 2, 0.3), (2, 2, 0.5)]),
        "prose": ftri_table([(1, 2, -0.2)]),
    }
    npmi = pd.DataFrame({"place": [1, 2], "layer": [1, 1], "expert": [2, 4], "npmi": [0.42, 0.9], "npmi_low": [0.3, 0.8],
                         "npmi_high": [0.5, 0.95], "joint_tokens": [12, 30]})
    combined = pd.DataFrame({"place": [1], "layer": [1], "expert": [2], "score": [0.7]})
    card = expert_card(store, 1, 2, ftri=ftri, npmi={"def": npmi, "think": combined}, top=2)
    assert [(c.label, c.place, c.difference) for c in card.contrasts] == [("math", 2, 0.3), ("code", 2, 0.1)]
    assert [(m.label, m.npmi, m.npmi_low, m.joint_tokens) for m in card.markers] == [("think", 0.7, None, None), ("def", 0.42, 0.3, 12)]
    single = expert_card(store, 1, 2, ftri=ftri["code"])
    assert [c.label for c in single.contrasts] == ["fTRI"]
    with pytest.raises(ValueError, match=r"the fTRI table 'bad' lacks the columns \['q_value'\]"):
        expert_card(store, 1, 2, ftri={"bad": ftri["code"].drop(columns="q_value")})


def test_bad_cells_are_refused_with_what_exists(store):
    with pytest.raises(ValueError, match=r"layer 0 is not an MoE layer of the trace; MoE layers are \[1, 2\]"):
        expert_card(store, 0, 2)
    with pytest.raises(ValueError, match="expert 8 is out of range: the trace's layers have experts 0-7"):
        expert_card(store, 1, 8)
    with pytest.raises(ValueError, match="window=-1"):
        expert_card(store, 1, 2, window=-1)


def test_html_escapes_once_and_marks_the_chosen_token(store):
    card = expert_card(store, 1, 2, ftri={"a<b": ftri_table([(1, 2, 0.3)])}, contexts=1, window=1)
    page = card_html(card)
    assert page.startswith("<div class='moelens-card'") and "load: 36.8% of the routing slots at layer 1 (7 of 19)" in page
    assert "&lt;b&gt;&amp;&quot;</span>" in page and "class='moelens-chosen'" in page
    assert TRICKY not in page and "&amp;lt;" not in page and "a&lt;b" in page
    assert "var(--jp-content-font-color1" in page and "var(--jp-layout-color1" in page  # follows the theme
