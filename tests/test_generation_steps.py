"""Step bookkeeping under ``generate`` on every family: prefill vs decode, positions, ``generated``
flags, rows that end early, and token-scoped interventions.

Ground truths: the sequences ``generate`` returned (which tokens were fed back, where each row's
EOS is), and what each router returned before and after the intervention's hook (hooks written
here). transformers >= 5.24 passes the KV cache as ``cache=`` and drops all-ones attention masks,
so a single unpadded prompt and an unpadded batch are the cases that need the cache to be found.
"""

from __future__ import annotations

import pytest
import torch

import moelens
from moelens.hooks.adapters import moe_layers
from moelens.interventions import disable, intervene
from tests.conftest import PROMPTS
from tests.test_interventions import KERNEL_FAMILIES

NEW_TOKENS = 6


def _generate(model, batch, **kwargs):
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def _trace_all(model):
    """A tracer for generations run with ``eos_token_id=None`` (EOS is an ordinary token there)."""
    return moelens.trace(model, end_token_ids=())


def _fed_tokens(sequences, attention_mask, end_token=None):
    """Per row, the real tokens the model was fed: the prompt without padding, then the new tokens
    that were fed back (all but the last step's), cut before the row's first ``end_token``."""
    prompt_length = attention_mask.shape[1]
    decode_steps = sequences.shape[1] - prompt_length - 1
    rows = []
    for row, mask in zip(sequences.tolist(), attention_mask.bool().tolist()):
        prompt = [t for t, real in zip(row[:prompt_length], mask) if real]
        new = row[prompt_length:][:decode_steps]
        if end_token is not None and end_token in new:
            new = new[: new.index(end_token)]
        rows.append((prompt, new))
    return rows


def _assert_tokens_are(tracer, expected):
    tokens = tracer.tokens.sort_values(["prompt_id", "position"])
    assert len(expected) > 0 and sorted(tokens["prompt_id"].unique().tolist()) == list(range(len(expected)))
    for prompt_id, (prompt, new) in enumerate(expected):
        own = tokens[tokens.prompt_id == prompt_id]
        assert own["token_id"].tolist() == prompt + new, prompt_id
        assert own["position"].tolist() == list(range(len(prompt) + len(new))), prompt_id
        assert own["generated"].tolist() == [False] * len(prompt) + [True] * len(new), prompt_id
    routes = tracer.routes
    per_token = routes.groupby(["prompt_id", "position"]).size()
    assert len(per_token) == len(tokens)  # every traced token has routes, no route without a token


def test_single_unpadded_prompt(tiny):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS[1:2], return_tensors="pt")
    with torch.no_grad(), _trace_all(model) as tracer:
        sequences = _generate(model, batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert sequences.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
    _assert_tokens_are(tracer, _fed_tokens(sequences, batch["attention_mask"]))


def test_unpadded_batch(tiny):
    """Equal-length rows: ``generate`` drops the all-ones mask, only the cache says "decode"."""
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[:3])["input_ids"]
    length = min(len(row) for row in ids)
    batch = {"input_ids": torch.tensor([row[:length] for row in ids])}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad(), _trace_all(model) as tracer:
        sequences = _generate(model, batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    _assert_tokens_are(tracer, _fed_tokens(sequences, batch["attention_mask"]))


def test_padded_batch(tiny):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert not batch["attention_mask"].all()
    with torch.no_grad(), _trace_all(model) as tracer:
        sequences = _generate(model, batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    _assert_tokens_are(tracer, _fed_tokens(sequences, batch["attention_mask"]))


def _early_end_token(model, tokenizer, batch):
    """A token that row 0 generates as its 2nd new token: declared the end token, row 0 ends
    early while row 1 (unless it generates it too) goes on."""
    with torch.no_grad():
        free = _generate(model, batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    prompt_length = batch["input_ids"].shape[1]
    first, second = free[0, prompt_length : prompt_length + 2].tolist()
    if second == first or second in free[1, prompt_length:].tolist():
        pytest.skip("row 1 generates row 0's second token too: no row ends early")
    return second


def test_rows_that_end_early_record_nothing_after_their_end(tiny):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
    end = _early_end_token(model, tokenizer, batch)
    with torch.no_grad(), moelens.trace(model, end_token_ids=[end]) as tracer:
        sequences = _generate(model, batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=end)
    expected = _fed_tokens(sequences, batch["attention_mask"], end_token=end)
    assert len(expected[0][1]) == 1 and len(expected[1][1]) == NEW_TOKENS - 1  # row 0 ended, row 1 ran on
    _assert_tokens_are(tracer, expected)


def test_end_tokens_default_to_the_generation_config():
    model, tokenizer = moelens.load("tiny:qwen3_moe")
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
    end = _early_end_token(model, tokenizer, batch)
    model.generation_config.eos_token_id = end
    with torch.no_grad(), moelens.trace(model) as tracer:
        sequences = _generate(model, batch, pad_token_id=tokenizer.pad_token_id)
    _assert_tokens_are(tracer, _fed_tokens(sequences, batch["attention_mask"], end_token=end))
    with torch.no_grad(), moelens.trace(model, end_token_ids=()) as everything:
        _generate(model, batch, pad_token_id=tokenizer.pad_token_id)
    assert everything.tokens.query("prompt_id == 0")["generated"].sum() == NEW_TOKENS - 1


def _by_expert(indices, weights):
    """(indices, weights) [T, k] with slots ordered by expert id (DeepSeek's own top-k is unsorted)."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order).float()


def _experts_calls(model, layer):
    """Record, per experts call at ``layer``, the routing before and after intervention hooks:
    call it inside the ``intervene`` block (the 'before' pre-hook is prepended ahead of moelens')."""
    calls: list[dict[str, torch.Tensor]] = []

    def before(module, args):
        calls.append({"tokens": args[0].reshape(-1, args[0].shape[-1]).shape[0], "raw": _by_expert(args[1], args[2])})

    def after(module, args):
        calls[-1]["final"] = _by_expert(args[1], args[2])

    return calls, [layer.experts.register_forward_pre_hook(before, prepend=True), layer.experts.register_forward_pre_hook(after)]


@pytest.mark.parametrize("scope", ["generated", "prompt"])
@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_token_scopes_act_on_exactly_their_steps(family, scope):
    """A single unpadded prompt (no attention mask on decode steps): the scope's steps never
    choose the disabled experts, the other steps get the family's own routing untouched."""
    model, tokenizer = moelens.load(f"tiny:{family}")
    batch = tokenizer(PROMPTS[1:2], return_tensors="pt")
    layer = moe_layers(model)[0]
    with torch.no_grad(), _trace_all(model) as plain:
        _generate(model, batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    routes = plain.routes.merge(plain.tokens, on=["prompt_id", "position"]).query("layer == @layer.index")
    in_scope_routes = routes[routes.generated == (scope == "generated")]
    busiest = in_scope_routes["expert"].value_counts().index[:2].tolist()
    with torch.no_grad(), intervene(model, disable({layer.index: busiest}, tokens=scope)):
        calls, handles = _experts_calls(model, layer)
        try:
            _generate(model, batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        finally:
            for handle in handles:
                handle.remove()
    assert len(calls) == NEW_TOKENS and calls[0]["tokens"] == batch["input_ids"].shape[1]
    disabled = torch.tensor(busiest)
    in_scope = [call for step, call in enumerate(calls) if (step > 0) == (scope == "generated")]
    out_of_scope = [call for step, call in enumerate(calls) if (step > 0) != (scope == "generated")]
    assert in_scope and out_of_scope
    assert any(torch.isin(call["raw"][0], disabled).any() for call in in_scope)  # the spec had something to change
    for call in in_scope:
        assert not torch.isin(call["final"][0], disabled).any()
    for call in out_of_scope:
        assert torch.equal(call["final"][0], call["raw"][0])
        torch.testing.assert_close(call["final"][1], call["raw"][1], rtol=1e-5, atol=1e-6)
