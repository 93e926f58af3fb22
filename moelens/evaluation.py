"""Language-model loss on texts, the yardstick of causal experiments (ablations, pruning, steering)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moelens.hooks.adapters import input_device

if TYPE_CHECKING:
    import torch


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (summed next-token negative log-likelihood in nats, number of predictions).

    Only predictions of a real token from a real token count, so left or right padding alike is
    excluded. logits [B, S, V], input_ids and attention_mask [B, S] -> two [B] tensors.
    """
    import torch

    real = attention_mask.bool()
    pairs = real[:, 1:] & real[:, :-1]  # [B, S-1]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, S-1]
    return nll.masked_fill(~pairs, 0.0).sum(dim=1), pairs.sum(dim=1)


def token_losses(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16) -> list[tuple[float, int]]:
    """Per text: (summed next-token negative log-likelihood in nats, number of predicted tokens).

    Padding is excluded; every text is scored as the tokenizer encodes it by default (with BOS if
    the tokenizer adds one). Runs under whatever interventions are active on ``model``.
    """
    import torch

    device = input_device(model)
    results: list[tuple[float, int]] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right").to(device)
        with torch.no_grad():
            logits = model(**batch).logits
        sums, counts = next_token_nll(logits, batch["input_ids"], batch["attention_mask"])
        results.extend(zip(sums.tolist(), counts.tolist()))
    return results


def mean_token_loss(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16) -> float:
    """Mean next-token loss (nats per predicted token) over all ``texts`` together."""
    losses = token_losses(model, tokenizer, texts, batch_size=batch_size)
    total = sum(loss for loss, _ in losses)
    count = sum(n for _, n in losses)
    if count == 0:
        raise ValueError("no predicted tokens: every text is a single token")
    return total / count
