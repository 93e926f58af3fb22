"""moelens' main paths call nothing deprecated in the locked versions.

Every DeprecationWarning, PendingDeprecationWarning and FutureWarning raised while the paths run
is an error here, so the day the lock moves to a release that deprecates something moelens calls
(as transformers 5.24 did with ``past_key_values=``), this test names it.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import moelens
from moelens import analysis
from moelens.cli import main
from moelens.interventions import disable, intervene, reweight
from moelens.interventions.contrast import generate_contrast

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@pytest.fixture
def deprecations_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for category in DEPRECATIONS:
            warnings.simplefilter("error", category)
        yield


def test_load_trace_intervene_contrast(deprecations_are_errors):
    model, tokenizer = moelens.load("moelens-tiny")  # from_pretrained of the shipped checkpoint
    batch = tokenizer(["def add(a, b):", "12 + 30 ="], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer, full_logits=True) as tracer:
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tracer.tokens["generated"].any()
    spec = disable({1: [0, 1]}) + reweight({2: [3]}, 2.0, tokens="generated")
    with torch.no_grad(), intervene(model, spec):
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = generate_contrast(model, tokenizer, ["12 + 30 ="], max_new_tokens=4)
    assert out.new_tokens.shape[1] >= 1
    report = analysis.profile_super_experts(model, tokenizer, ["def add(a, b):\n    return a + b"])
    assert len(report.experts) > 0
    importance = analysis.expert_importance(model, tokenizer, {"code": ["def f(x):"], "arith": ["1 + 2 = 3"]})
    assert len(importance) > 0


def test_collect_and_analyses(tmp_path, deprecations_are_errors, capsys):
    records = [{"text": t, "domain": d} for d, t in [("code", "def f(x): return x"), ("en", "The river flows"),
                                                      ("code", "for i in range(3):"), ("en", "A quiet morning")] * 3]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(["collect", "moelens-tiny", str(prompts), "--out", str(tmp_path / "s"), "--max-new-tokens", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    store = moelens.read_trace(tmp_path / "s")
    assert len(analysis.expert_frequency(store, by=["domain"])) > 0
    assert len(analysis.load_balance(store)) > 0
    ftri = analysis.ftri_scores(store, tag="domain", target="code", permutations=50)
    assert len(ftri) > 0
    assert len(analysis.npmi_scores(store, markers=["def", "for"], min_count=1)) > 0
    analysis.write_html(analysis.heatmap(ftri, "difference"), tmp_path / "ftri.html")
    assert (tmp_path / "ftri.html").stat().st_size > 0
