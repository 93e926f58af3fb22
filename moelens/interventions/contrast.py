"""SCMoE self-contrast decoding ("Unchosen Experts Can Contribute Too").

Per step, with strong logits z_s (default routing, or a ``strong`` spec) and weak logits z_w (the
``weak`` spec, default ``rank(1)``: each token's second choice only, in every MoE layer)::

    z = (1 + beta) * z_s - beta * z_w      on tokens with z_s >= log(alpha) + max(z_s)
    z = -inf                               elsewhere

then greedy argmax (or, with a :class:`Sampling`, sampling from softmax(z / temperature)). Both passes run as ONE batched
forward per step: rows [0, B) are the strong copies, rows [B, 2B) the weak copies with the weak
routing applied to those rows only, each row with its own KV cache entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moelens.hooks.adapters import input_device
from moelens.interventions.apply import intervene
from moelens.interventions.spec import Intervention, rank

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Sampling:
    """Sample each next token from softmax(z / ``temperature``) of the contrasted logits z instead of
    taking the arg-max; ``generator`` (a ``torch.Generator`` on the model's input device) makes it repeatable."""

    temperature: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")


@dataclass(frozen=True)
class ContrastOutput:
    """What :func:`generate_contrast` produced, per prompt in input order."""

    sequences: torch.Tensor  # [B, prompt + new] left-padded prompt followed by the generated tokens
    new_tokens: torch.Tensor  # [B, new]; pad after a row finished
    texts: list[str]  # decoded new tokens per prompt


def contrast_logits(strong: torch.Tensor, weak: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """SCMoE's contrasted next-token logits: [..., V] strong and weak logits (same shape) -> [..., V] float,
    ``(1 + beta) * strong - beta * weak`` where ``strong >= log(alpha) + max(strong)``, -inf elsewhere."""
    import torch

    cutoff = strong.max(dim=-1, keepdim=True).values + math.log(alpha)
    contrasted = (1 + beta) * strong - beta * weak
    return contrasted.masked_fill(strong < cutoff, -torch.inf)


def generate_contrast(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    strong: Intervention | None = None,
    weak: Intervention | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    ban_eos: bool = False,
) -> ContrastOutput:
    """Generate from ``prompts`` with self-contrast decoding: greedy, or sampled with ``sampling``.

    Prompts are left-padded into one batch; every token of a prompt is fed, and each row stops
    after its EOS (then fed padding) or after ``max_new_tokens`` new tokens.

    Args:
        strong: routing of the strong pass; ``None`` = the model's own top-k routing.
        weak: routing of the weak pass; ``None`` = ``rank(1)`` (only each token's second choice; ranks count
            from 0, 0 = the router's first choice).
        beta: contrast strength (the paper's typical value 0.5).
        alpha: plausibility cut-off in (0, 1]: tokens whose strong probability is below alpha x the best are excluded.
        sampling: ``None`` (default) takes the arg-max; a :class:`Sampling` samples at its temperature.
        ban_eos: never choose the EOS token (the authors' code does so by default; every row then
            runs to ``max_new_tokens``).

    Weak activations of the paper: ``rank(1)`` (default, the second choice) and ``top_k(1)`` (DeepSeekMoE), both on
    the family's routed scale.
    """
    import torch

    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    weak = weak if weak is not None else rank(1)
    device = input_device(model)
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    batch = encoded["input_ids"].shape[0]
    input_ids = encoded["input_ids"].repeat(2, 1)  # [2B, S]: strong copies, then weak copies
    mask = encoded["attention_mask"].repeat(2, 1)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    cache = None
    step_ids = input_ids
    with torch.no_grad(), intervene(model, weak, rows=slice(batch, 2 * batch)), intervene(model, strong or Intervention(), rows=slice(0, batch)):
        for _ in range(max_new_tokens):
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            output = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache = output.cache
            last = output.logits[:, -1].float()  # [2B, V]
            scores = contrast_logits(last[:batch], last[batch:], beta=beta, alpha=alpha)
            if ban_eos and eos is not None:
                scores[:, eos] = -torch.inf
            if sampling is not None:
                probabilities = torch.softmax(scores / sampling.temperature, dim=-1)
                token = torch.multinomial(probabilities, 1, generator=sampling.generator).squeeze(-1)
            else:
                token = scores.argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new_tokens.append(token)
            step_ids = token.repeat(2)[:, None]  # [2B, 1]
            mask = torch.cat([mask, (~finished).long().repeat(2)[:, None]], dim=1)  # rows done earlier feed padding
            if eos is not None:
                finished |= token == eos
            if bool(finished.all()):
                break
    generated = torch.stack(new_tokens, dim=1)
    return ContrastOutput(
        sequences=torch.cat([encoded["input_ids"], generated], dim=1),
        new_tokens=generated,
        texts=tokenizer.batch_decode(generated, skip_special_tokens=True),
    )
