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


def continuation_logprob(model: Any, tokenizer: Any, prompt: str, continuation: str) -> tuple[float, int]:
    """(sum of ln p(token | prompt, earlier continuation tokens) in nats, number of tokens) of
    ``continuation`` after ``prompt``: the number steering experiments report for a reference answer.

    The prompt is encoded as generation encodes it (special tokens included), the continuation
    without special tokens, and the two id sequences are joined (no re-tokenisation across the
    seam). The prompt runs as one prefill and each continuation token but the last is then fed
    as a decode step with the KV cache, as if the model had generated it: interventions scoped to
    ``"generated"`` tokens steer exactly the continuation, as they would in ``generate``. Runs
    under whatever interventions are active on ``model``.
    """
    import torch

    device = input_device(model)
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # [1, P]
    target = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)  # [1, C]
    if target.shape[1] == 0:
        raise ValueError(f"the continuation {continuation!r} encodes to no tokens; give a non-empty reference")
    total = 0.0
    cache = None
    step_ids = prompt_ids
    with torch.no_grad():
        for index in range(target.shape[1]):
            output = model(input_ids=step_ids, cache=cache, use_cache=True)
            cache = output.cache
            log_probs = torch.log_softmax(output.logits[0, -1].float(), dim=-1)  # [V]
            total += float(log_probs[target[0, index]])
            step_ids = target[:, index : index + 1]  # [1, 1], fed next as a decode step
    return total, int(target.shape[1])
