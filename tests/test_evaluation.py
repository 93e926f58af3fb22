"""Loss evaluation against a direct computation with the model's own loss."""

from __future__ import annotations

import pytest
import torch

import moelens
from moelens.evaluation import mean_token_loss, token_losses


def test_losses_match_the_models_own_loss_per_text():
    model, tokenizer = moelens.load("tiny:mixtral")
    texts = ["a short one", "a somewhat longer text to pad the batch", "x y"]
    batched = token_losses(model, tokenizer, texts, batch_size=3)
    for text, (total, count) in zip(texts, batched):
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            own = model(input_ids=ids, labels=ids).loss.item()  # mean over the text's predicted tokens
        assert count == ids.shape[1] - 1
        assert total / count == pytest.approx(own, rel=1e-5)
    pooled = sum(t for t, _ in batched) / sum(n for _, n in batched)
    assert mean_token_loss(model, tokenizer, texts, batch_size=2) == pytest.approx(pooled, rel=1e-6)
