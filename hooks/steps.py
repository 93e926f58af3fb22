"""Token bookkeeping for one forward call of a decoder stack (a *step*).

Both the tracer and the interventions need to know, for every token a forward call processes,
whether it is padding, its position within its prompt, and whether it was generated. All of it is
derived from the call's arguments with shape arithmetic and device ops only: no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class StepTokens:
    """The tokens of one forward call, laid out [B, S] like its input_ids."""

    input_ids: torch.Tensor | None  # [B, S], None when the call passed inputs_embeds
    positions: torch.Tensor  # [B, S] position within the prompt, padding excluded, generated tokens continuing
    real: torch.Tensor  # [B, S] bool, False on padding
    past: int  # tokens already in the KV cache: 0 on a prefill, > 0 on a decode step

    @property
    def generated(self) -> bool:
        """Decode steps feed back tokens the model produced."""
        return self.past > 0

    @classmethod
    def from_call(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepTokens:
        """Read the bookkeeping from a decoder stack's forward arguments."""
        import torch

        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        batch, new = reference.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = mask.shape[1] - new  # the mask spans cache + new tokens: shape arithmetic, no sync
            running = mask.long().cumsum(dim=1) - 1  # [B, past+new] position among real tokens
            return cls(input_ids, running[:, -new:], mask[:, -new:].bool(), past)
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None else 0
        positions = (torch.arange(new, device=reference.device) + past).expand(batch, new)
        return cls(input_ids, positions, torch.ones(batch, new, dtype=torch.bool, device=reference.device), past)


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder ``layers`` (e.g. ``model.model``): one forward per step."""
    from torch import nn

    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder stack with a `layers` ModuleList")
