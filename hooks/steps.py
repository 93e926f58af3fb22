"""Token bookkeeping for one forward call of a decoder stack (a *step*).

Both the tracer and the interventions need to know, for every token a forward call processes,
whether it is padding, its position within its prompt, and whether it was generated. All of it is
derived from the call's arguments with shape arithmetic and device ops only: no host sync.

Nothing here depends on what transformers names its arguments beyond ``input_ids`` /
``inputs_embeds`` / ``attention_mask``: the KV cache is found by type among all arguments
(transformers 5.24 renamed ``past_key_values`` to ``cache``; the next rename changes nothing here),
and ``generate`` drops an all-ones attention mask, so the cache length is what tells a decode step
from a prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StepTokens:
    """The tokens of one forward call, laid out [B, S] like its input_ids."""

    input_ids: torch.Tensor | None  # [B, S], None when the call passed inputs_embeds
    positions: torch.Tensor  # [B, S] position within the prompt, padding excluded, generated tokens continuing
    real: torch.Tensor  # [B, S] bool, False on padding (and, after end_rows, on tokens fed after a row's end token)
    past: int  # tokens already in the KV cache: 0 on a prefill, > 0 on a decode step

    @property
    def generated(self) -> bool:
        """Decode steps feed back tokens the model produced."""
        return self.past > 0

    @classmethod
    def from_call(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepTokens:
        """Read the bookkeeping from a decoder stack's forward arguments."""
        import torch

        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise ValueError("a decoder stack was called with neither input_ids nor inputs_embeds")
        batch, new = reference.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = mask.shape[1] - new  # the mask spans cache + new tokens: shape arithmetic, no sync
            running = mask.long().cumsum(dim=1) - 1  # [B, past+new] position among real tokens
            return cls(input_ids, running[:, -new:], mask[:, -new:].bool(), past)
        past = cached_tokens(args, kwargs)
        positions = (torch.arange(new, device=reference.device) + past).expand(batch, new)
        return cls(input_ids, positions, torch.ones(batch, new, dtype=torch.bool, device=reference.device), past)

    def end_rows(self, ended: torch.Tensor | None, end_token_ids: torch.Tensor) -> tuple[StepTokens, torch.Tensor]:
        """Mark tokens fed after each row's end token as not real.

        In a batched ``generate`` a row that produced an end token (EOS) keeps being fed (the EOS
        once, then padding) while other rows go on, with its attention mask extended by ones: those
        tokens never exist in the row's text. On a decode step, a row ends at the first fed token
        in ``end_token_ids`` [n]; that token and every later one of the row are not real.
        ``ended`` [B] says which rows ended in earlier steps (``None``: none); ``end_token_ids``
        should already be on the tokens' device (a copy here would block at every step). Prompt
        tokens (prefill) are never cut: an EOS the user wrote is part of the prompt.

        Returns the updated tokens and the new ``ended`` [B] (device ops only, no sync).
        """
        import torch

        batch = self.real.shape[0]
        ended = torch.zeros(batch, dtype=torch.bool, device=self.real.device) if ended is None else ended
        if not self.generated or self.input_ids is None:
            return self, ended
        hit = torch.isin(self.input_ids, end_token_ids) & self.real  # [B, S]
        after = (hit.long().cumsum(dim=1) > 0) | ended[:, None]  # [B, S] at or after the row's end
        return replace(self, real=self.real & ~after), after[:, -1]


def cached_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Tokens already held by the KV cache passed to a forward call (0 without a cache).

    The cache is recognised by what it is (an object with ``get_seq_length``), under any argument
    name or position.
    """
    for value in (*kwargs.values(), *args):
        length = getattr(value, "get_seq_length", None)
        if callable(length):
            return int(length())
    return 0
