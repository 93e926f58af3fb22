"""A moelens experts implementation that computes exactly what eager does and reports each expert's output.

transformers 5.x fuses a layer's experts into 3-D weights, so there is no per-expert module to hook.
Every experts class decorated with ``@use_experts_implementation`` looks its forward up by name
(``config._experts_implementation``) in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` at
each call. :func:`profiling_experts` registers :data:`IMPLEMENTATION` there, switches the model to
it with ``model.set_experts_implementation`` and restores the previous implementation on exit,
also when the body raises.

The implementation runs the same per-expert loop as transformers' eager path (same row order, same
operations, same accumulation order), so the model's outputs are bitwise those of
``experts_implementation="eager"`` (allclose to the default ``grouped_mm``). While at it, it hands
each expert's down_proj output (before the routing weight) and the layer's routed output to an
:class:`ExpertsObserver`; experts modules without an observer are computed and left alone.

Supported: every experts class that goes through the interface and follows its weight layout
conventions (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``,
``_apply_gate``): all moelens families (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
deepseek_v3, gpt_oss, granitemoe, phimoe). An experts module that does not use the interface, or
whose config is not switched by ``set_experts_implementation``, is refused with
:class:`~moelens.hooks.adapters.UnsupportedModelError` (there is no hook-based fallback); a layer
whose experts never ran through the implementation (a hub kernel replaced the block's forward)
raises :class:`ProfilingError` at the end of the block.

The module also turns texts into padded batches with the token bookkeeping the observers need
(:func:`token_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from moelens.errors import ProfilingError, UnsupportedModelError


if TYPE_CHECKING:
    import torch
    from torch import nn

IMPLEMENTATION = "moelens_profiling"

# id(experts module) -> observer; filled only inside `profiling_experts`
_OBSERVERS: dict[int, ExpertsObserver] = {}
_CALLED: set[int] = set()


class ExpertsObserver(Protocol):
    """Receives what one layer's experts computed; tensors are the live ones, do not modify them."""

    def expert_output(self, expert: int, tokens: torch.Tensor, output: torch.Tensor, weights: torch.Tensor) -> None:
        """``tokens`` [n]: rows of the layer's flattened input routed to ``expert``; ``output`` [n, H]:
        the expert's down_proj output (bias and post-expert norm included, routing weight not);
        ``weights`` [n]: the routing weights the model multiplies it with."""

    def routed_output(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """``hidden_states`` [T, H]: the experts' input; ``output`` [T, H]: the weighted sum of routed experts."""


def profiling_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward registered as :data:`IMPLEMENTATION`: eager's loop plus observation."""
    import torch

    observer = _OBSERVERS.get(id(self))
    if observer is not None:
        _CALLED.add(id(self))
    final = torch.zeros_like(hidden_states)
    # [k, T]: visiting (rank, token) pairs rank-major gives each expert the same rows, in the same
    # order, as eager's one_hot(...).permute(2, 1, 0); expert order (ascending) fixes the summation order.
    by_rank = top_k_index.t()
    for expert in torch.unique(top_k_index).tolist():
        if expert >= self.num_experts:  # an expert-parallel sentinel: the expert lives on another rank
            continue
        rank, tokens = torch.where(by_rank == expert)
        output = _expert_mlp(self, hidden_states[tokens], expert)  # [n, H]
        weights = top_k_weights[tokens, rank]  # [n]
        if observer is not None:
            observer.expert_output(expert, tokens, output, weights)
        final.index_add_(0, tokens, (output * weights[:, None]).to(final.dtype))
    if observer is not None:
        observer.routed_output(hidden_states, final)
    return final


def _expert_mlp(self: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's MLP on its rows ``x`` [n, H] -> [n, H], in the class's weight layout."""
    bias = self.has_bias
    if self.has_gate:
        up = _linear(x, self.gate_up_proj[expert], self.gate_up_proj_bias[expert] if bias else None, self.is_transposed)
        hidden = self._apply_gate(up)
    else:
        up = _linear(x, self.up_proj[expert], self.up_proj_bias[expert] if bias else None, self.is_transposed)
        hidden = self.act_fn(up)
    out = _linear(hidden, self.down_proj[expert], self.down_proj_bias[expert] if bias else None, self.is_transposed)
    return self.post_expert_norm(out) if self.has_post_expert_norm else out


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    import torch.nn.functional as F

    if transposed:  # weight [in, out], as eager writes it for these classes (GPT-OSS)
        return x @ weight + bias if bias is not None else x @ weight
    return F.linear(x, weight, bias)  # weight [out, in]


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not profiling_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, profiling_experts_forward)


def _check_supported(model: nn.Module, experts: Sequence[nn.Module]) -> None:
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is None or not can_set():
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot switch its experts implementation (its modelling code does not use "
            "transformers' @use_experts_implementation), so moelens cannot profile its experts."
        )
    for module in experts:
        if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "config", "num_experts")):
            raise UnsupportedModelError(
                f"{type(module).__name__} does not dispatch through transformers' experts interface; moelens "
                "profiles fused experts only through it (no hook-based fallback)."
            )


@contextmanager
def profiling_experts(model: nn.Module, observers: Mapping[nn.Module, ExpertsObserver]) -> Iterator[None]:
    """Run ``model``'s experts through :data:`IMPLEMENTATION`, reporting to ``observers`` (experts module -> observer).

    On exit the previous experts implementation is restored (also if the body raises); model
    weights are never touched. Raises :class:`ProfilingError` if, after a body that ran without
    error, an observed experts module never ran through the implementation.
    """
    _check_supported(model, list(observers))
    if any(id(m) in _OBSERVERS for m in observers):
        raise ProfilingError("these experts are already being profiled; nested profiling of one model is not supported")
    _register()
    previous = model.get_experts_implementation()
    _CALLED.difference_update(id(m) for m in observers)
    try:
        _OBSERVERS.update({id(m): o for m, o in observers.items()})
        model.set_experts_implementation(IMPLEMENTATION)
        stuck = [type(m).__name__ for m in observers if m.config._experts_implementation != IMPLEMENTATION]
        if stuck:
            raise UnsupportedModelError(
                f"set_experts_implementation did not reach the config of {stuck[0]}; moelens cannot profile it."
            )
        yield
        silent = [m for m in observers if id(m) not in _CALLED]
        if silent:
            raise ProfilingError(
                f"{len(silent)} experts module(s) ({type(silent[0]).__name__}) never ran through the moelens "
                "implementation: a hub kernel or compiled graph replaced the MoE block's forward. Load the model "
                "with use_kernels=False and do not compile it."
            )
    finally:
        for module in observers:
            _OBSERVERS.pop(id(module), None)
            _CALLED.discard(id(module))
        model.set_experts_implementation(previous)


# --- batching -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenBatch:
    """A padded batch and, per flattened token (row-major over [B, S], the experts' row order), who it is."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask: [B, S]
    text: torch.Tensor  # [B*S] index of the text in the caller's sequence
    position: torch.Tensor  # [B*S] position within its text (0 = first token), -1 on padding
    valid: torch.Tensor  # [B*S] bool, False on padding

    @property
    def shape(self) -> tuple[int, int]:
        """(B, S): texts in the batch, padded length."""
        return tuple(self.inputs["input_ids"].shape)  # type: ignore[return-value]

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, first_text: int = 0) -> TokenBatch:
        """The bookkeeping of a padded batch: ``input_ids`` and ``attention_mask`` [B, S] (1 on real tokens,
        either padding side); row b is text ``first_text + b``, positions count its real tokens from 0."""
        import torch

        mask = attention_mask.bool()  # [B, S]
        position = torch.where(mask, mask.long().cumsum(dim=1) - 1, -1)
        text = (torch.arange(mask.shape[0], device=mask.device) + first_text)[:, None].expand_as(mask)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return cls(inputs, text.reshape(-1), position.reshape(-1), mask.reshape(-1))


def token_batches(
    tokenizer: Any, texts: Sequence[str], *, batch_size: int, device: Any, max_length: int | None = None
) -> Iterator[TokenBatch]:
    """Tokenize ``texts`` (with the tokenizer's special tokens and padding side) in batches of ``batch_size``
    texts, on ``device``; ``max_length`` truncates each text to that many tokens (None: whole texts)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        encoded = tokenizer(  # a single text needs no padding (and so no pad token)
            chunk, return_tensors="pt", padding=len(chunk) > 1, truncation=max_length is not None, max_length=max_length
        )
        yield TokenBatch.from_ids(encoded["input_ids"].to(device), encoded["attention_mask"].to(device), first_text=start)
