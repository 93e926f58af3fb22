"""``moelens.load``: a model and its tokenizer from a local checkpoint or the built-in zoo.

Names:
    ``moelens-tiny``       the trained MoE shipped in ``data/models/moelens-tiny`` (the default model)
    ``tiny:<family>``      a seeded random tiny model of a supported family (see ``moelens zoo list``)
    a directory            a Hugging Face checkpoint on disk; moelens never downloads from a hub
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "moelens-tiny"
TINY_PREFIX = "tiny:"


def shipped_path(*parts: str) -> Path:
    """A file or folder under the data moelens ships (``data/`` in the repository, installed as the
    package data ``moelens/data/``): the trained model and the probe sets."""
    from importlib.resources import files

    path = Path(str(files("moelens").joinpath("data", *parts)))
    if not path.exists():
        raise FileNotFoundError(
            f"moelens' shipped data {'/'.join(parts)} is missing at {path}: this installation of moelens is "
            "incomplete. Reinstall it from a wheel or sdist built by `python -m build` (which includes data/)."
        )
    return path


_SHIPPED = {DEFAULT_MODEL: ("models", DEFAULT_MODEL)}


class ModelNotFoundError(FileNotFoundError):
    """The name is neither a zoo model nor a local checkpoint directory."""


def zoo_names() -> list[str]:
    """Every name :func:`load` accepts besides a directory."""
    from moelens.zoo.tiny import TINY_FAMILIES

    return [*_SHIPPED, *(f"{TINY_PREFIX}{family}" for family in TINY_FAMILIES)]


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint directory behind ``name_or_path``, or ``None`` for a ``tiny:`` model."""
    name = str(name_or_path)
    if name.startswith(TINY_PREFIX):
        return None
    path = shipped_path(*_SHIPPED[name]) if name in _SHIPPED else Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{name!r} is not a model: no directory {path} exists. Pass a local Hugging Face checkpoint "
            f"directory (moelens never downloads from a hub) or one of: {', '.join(zoo_names())}."
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} is not a Hugging Face checkpoint: it has no config.json. Point at the folder that "
            "holds config.json and the weights (*.safetensors)."
        )
    return path


def load(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | Any | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode and check it is a supported MoE model.

    Args:
        name_or_path: ``"moelens-tiny"``, ``"tiny:<family>"`` or a checkpoint directory.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ignored with ``device_map``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a torch dtype, or ``None`` for float32
            (exact comparisons and CPU kernels want float32; use bfloat16 on GPUs for large models).
        device_map: passed to transformers (e.g. ``"auto"`` to spread a large model over GPUs).
        trust_remote_code: allow custom modelling code shipped with the checkpoint (off by default).

    Raises:
        ModelNotFoundError: the name is not a zoo model and not a checkpoint directory.
        moelens.hooks.adapters.UnsupportedModelError: the model has no MoE layers or its family is
            not supported (the message names the supported families).
    """
    import torch

    from moelens.hooks.adapters import moe_layers

    torch_dtype = _torch_dtype(dtype)
    checkpoint = resolve_checkpoint(name_or_path)
    if checkpoint is None:
        from moelens.zoo.tiny import build_tiny

        model, tokenizer = build_tiny(str(name_or_path)[len(TINY_PREFIX) :])
        model = model.to(dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    moe_layers(model)  # fail now, with the family-aware message, rather than at the first trace
    return model, tokenizer


def _torch_dtype(dtype: str | Any | None) -> Any:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def save_zoo_model(name: str, out_dir: str | os.PathLike[str]) -> Path:
    """Write zoo model ``name`` to ``out_dir`` as an ordinary Hugging Face checkpoint directory."""
    model, tokenizer = load(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
