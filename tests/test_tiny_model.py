"""The shipped ``moelens-tiny`` checkpoint and probe sets: loadable, as documented, and specialized."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moelens.interventions import disable, intervene  # noqa: E402
from moelens.training import evidence as ev  # noqa: E402
from moelens.training.corpus import DOMAINS  # noqa: E402
from moelens.training.probes import MARKERS, write_probes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "data" / "models" / "moelens-tiny"
PROBES = REPO / "data" / "probes"


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return m.eval()


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (PROBES / f"{name}.jsonl").read_text().splitlines() if line]


def test_plain_from_pretrained_gives_the_documented_qwen3_moe():
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok,
            c.moe_intermediate_size, c.vocab_size) == ("qwen3_moe", 4, 128, 16, 2, 256, 4096)
    assert c.mlp_only_layers == [] and c.decoder_sparse_step == 1  # every layer is an MoE layer
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    for fact in ("4 layers", "hidden 128", "16 experts", "top-2", "expert width 256", "4096"):
        assert fact in card, fact
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size <= 25 * 2**20, size


def test_tokenizer_prepends_bos_and_round_trips(tokenizer):
    ids = tokenizer("def f(x):\n    return 12 + 345")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 0
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def f(x):\n    return 12 + 345"


def test_probe_files_are_well_formed(tokenizer):
    domains = _rows("domains")
    assert Counter(r["domain"] for r in domains) == {d: 100 for d in DOMAINS}
    markers = _rows("markers")
    marker_counts = Counter(m for r in markers for m in r["markers"])
    assert all(marker_counts[m] >= 60 for m in MARKERS), marker_counts
    assert any(not r["markers"] for r in markers)  # controls
    tasks = _rows("arith_tasks")
    assert 60 <= len(tasks) <= 150
    for task in tasks:
        a, op, b = re.fullmatch(r"(?s).*\n(\d+) ([-+*/]) (\d+) =", task["text"]).groups()
        expected = int(a) // int(b) if op == "/" else eval(f"{a} {op} {b}")  # noqa: S307 (digits only)
        assert task["answer"] == str(expected)
    calibration = _rows("calibration")
    assert 60 <= len(calibration) <= 150 and set(r["domain"] for r in calibration) == set(DOMAINS)
    for row in domains + markers + tasks + calibration:
        assert 16 <= len(tokenizer(row["text"])["input_ids"]) <= 96, row


def test_probe_files_are_what_the_script_writes(tmp_path, tokenizer):
    write_probes(tmp_path, seed=0, tokenizer=tokenizer)
    for name in ("domains", "markers", "arith_tasks", "calibration"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (PROBES / f"{name}.jsonl").read_text(), name


@pytest.fixture(scope="module")
def probe_halves(model, tokenizer):
    """Per domain: routing counts on the even-numbered prompts, token ids of the odd-numbered ones."""
    rows = _rows("domains")
    texts = {d: tokenizer([r["text"] for r in rows if r["domain"] == d])["input_ids"] for d in DOMAINS}
    return ({d: ev.routing_counts(model, seqs[::2]) for d, seqs in texts.items()},
            {d: seqs[1::2] for d, seqs in texts.items()})


@pytest.mark.parametrize("domain", ["arith", "de", "python"])
def test_disabling_a_domains_top_experts_hurts_it_more_than_random_experts(model, probe_halves, domain):
    select, evaluate = probe_halves
    held_out = evaluate[domain]
    base = ev.mean_loss(model, held_out)

    def increase(experts: dict[int, list[int]]) -> float:
        with intervene(model, disable(experts)):
            return (ev.mean_loss(model, held_out) - base) / base

    targeted = increase(ev.overused_experts(select, domain, 2))
    gen = torch.Generator().manual_seed(0)
    random = [increase({layer: torch.randperm(16, generator=gen)[:2].tolist() for layer in range(4)})
              for _ in range(5)]
    random_mean = sum(random) / len(random)
    assert targeted > 2 * random_mean and targeted > 0.05, (targeted, random)
    # leaving the intervention restores the router: the loss is the baseline again
    assert ev.mean_loss(model, held_out) == pytest.approx(base, rel=1e-6)


@pytest.mark.slow
def test_the_evidence_script_reproduces_the_cards_probe_numbers(tmp_path):
    """The card quotes evidence-probes.json; rerunning the script on this machine gives it again."""
    shipped = json.loads((MODEL_DIR / "evidence-probes.json").read_text())
    fresh = ev.evidence(MODEL_DIR, None, out_dir=tmp_path)
    assert fresh["nmi_per_layer"] == pytest.approx(shipped["nmi_per_layer"], abs=2e-3)
    assert fresh["unused_experts_per_layer"] == shipped["unused_experts_per_layer"]
    for domain, row in shipped["ablation"].items():
        assert fresh["ablation"][domain]["experts"] == row["experts"]
        for key in ("own", "others_mean", "random_mean"):
            assert fresh["ablation"][domain][key] == pytest.approx(row[key], abs=5e-3), (domain, key)
        assert fresh["ablation"][domain]["passes"] == row["passes"]
