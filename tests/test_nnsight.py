"""moelens helpers inside nnsight blocks agree with moelens' own tracer and interventions."""

from __future__ import annotations

import warnings

import pytest
import torch

import moelens
from moelens import nnsight_ops
from moelens.hooks.adapters import moe_layers
from moelens.interventions import disable, force, intervene, reweight

nnsight = pytest.importorskip("nnsight")

PROMPT = "def add(a, b): return a + b"


def _wrap(family: str):
    model, tokenizer = moelens.load(f"tiny:{family}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
        return model, tokenizer, nnsight.LanguageModel(model, tokenizer=tokenizer)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_capture_routes_equals_the_tracer(family):
    model, tokenizer, lm = _wrap(family)
    with lm.trace(PROMPT):
        captured = nnsight_ops.capture_routes(lm)
    with torch.no_grad(), moelens.trace(model) as tracer:
        model(**tokenizer([PROMPT], return_tensors="pt"))
    assert len(captured) == len(moe_layers(model))
    for layer, (weights, indices) in captured.items():
        # compare per token by expert id: the tracer orders slots by choice, the router as it likes
        order = indices.argsort(dim=-1, stable=True)
        expected = tracer.routes.query("layer == @layer").sort_values(["position", "expert"])
        assert indices.gather(-1, order).reshape(-1).tolist() == expected["expert"].tolist()
        got_weights = weights.detach().float().gather(-1, order).reshape(-1).numpy()
        assert got_weights == pytest.approx(expected["weight"].to_numpy(), rel=2e-3, abs=1e-3)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_steer_equals_intervene(family):
    model, tokenizer, lm = _wrap(family)
    first = moe_layers(model)[0].index
    spec = disable({first: [0, 1]}) + force({first: [2]}) + reweight({first: [3]}, 4.0)
    with lm.trace(PROMPT):
        nnsight_ops.steer(lm, spec)
        steered = lm.output.logits.save()
    with torch.no_grad(), intervene(model, spec):
        expected = model(**tokenizer([PROMPT], return_tensors="pt")).logits
    with torch.no_grad():
        plain = model(**tokenizer([PROMPT], return_tensors="pt")).logits
    torch.testing.assert_close(steered.detach(), expected, rtol=1e-5, atol=1e-5)
    assert (steered.detach() - plain).abs().max() > 1e-3  # the steering did something


def test_steer_every_generation_step():
    model, tokenizer, lm = _wrap("qwen3_moe")
    first = moe_layers(model)[0].index
    spec = disable({first: [0, 1, 2, 3]})
    with lm.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id) as tracer:
        steps = nnsight.save(list())
        for _ in tracer.iter[0:4]:  # one iteration per forward: prefill + 3 decode steps
            nnsight_ops.steer(lm, spec)
            steps.append(nnsight_ops.capture_routes(lm)[first][1])
        tokens = tracer.result.save()
    batch = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad(), intervene(model, spec):
        expected = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokens.tolist() == expected.tolist()
    assert len(steps) == 4 and not any(torch.isin(s, torch.tensor([0, 1, 2, 3])).any() for s in steps)
