"""``moelens.load``: a model and its tokenizer from the zoo, a local checkpoint or a hub id.

Names:
    ``moelens-tiny``       the trained MoE shipped in ``data/models/moelens-tiny`` (the default model)
    ``tiny:<family>``      a seeded random tiny model of a supported family (see ``moelens zoo list``)
    a directory            a Hugging Face checkpoint on disk
    ``org/name``           a Hugging Face hub id, resolved by transformers through the local
                           Hugging Face cache (offline with ``HF_HUB_OFFLINE=1``) or the hub
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelens.errors import ModelNotFoundError

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


def zoo_names() -> list[str]:
    """Every name :func:`load` accepts besides a directory."""
    from moelens.zoo.tiny import TINY_FAMILIES

    return [*_SHIPPED, *(f"{TINY_PREFIX}{family}" for family in TINY_FAMILIES)]


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path | str | None:
    """Where :func:`load` reads ``name_or_path`` from: a checkpoint directory, a hub id (a string,
    resolved by transformers), or ``None`` for a ``tiny:`` model."""
    name = str(name_or_path)
    if name.startswith(TINY_PREFIX):
        return None
    if name in _SHIPPED:
        return shipped_path(*_SHIPPED[name])
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a Hugging Face checkpoint: it has no config.json. Point at the folder that "
                "holds config.json and the weights (*.safetensors)."
            )
        return path
    if _HUB_ID.fullmatch(name):
        return name
    raise ModelNotFoundError(
        f"{name!r} is not a model: no directory {path} exists and it is not a hub id (org/name). Pass a "
        f"checkpoint directory, a Hugging Face hub id, or one of: {', '.join(zoo_names())}."
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | Any | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    **from_pretrained: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode and check it is a supported MoE model.

    Args:
        name_or_path: ``"moelens-tiny"``, ``"tiny:<family>"``, a checkpoint directory or a hub id.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ignored with ``device_map``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a torch dtype, or ``None`` for float32
            (exact comparisons and CPU kernels want float32; use bfloat16 on GPUs for large models).
        device_map: passed to transformers (``"auto"``, or a {module: device} mapping where a device
            may be ``"cpu"`` or ``"disk"``: offloading needs ``offload_folder`` and the
            ``moelens[big]`` extra, i.e. accelerate).
        trust_remote_code: allow custom modelling code shipped with the checkpoint (off by default).
        progress: show transformers' weight-loading progress bars (off by default, so a notebook
            cell that loads a model prints nothing; turn it on for large checkpoints).
        **from_pretrained: every other ``from_pretrained`` option, forwarded as is
            (``offload_folder``, ``max_memory``, ``quantization_config``, ``revision``,
            ``attn_implementation``, ``experts_implementation``...); for checkpoints and hub ids only.

    Raises:
        ModelNotFoundError: the name is not a zoo model, not a checkpoint directory, or a hub id
            that is neither in the local Hugging Face cache nor reachable.
        moelens.errors.UnsupportedModelError: the model has no MoE layers moelens can
            read (the message says what was found instead).
    """
    from moelens.hooks.adapters import moe_layers

    torch_dtype = _torch_dtype(dtype)
    checkpoint = resolve_checkpoint(name_or_path)
    if checkpoint is None:
        if from_pretrained:
            raise TypeError(f"tiny models are built, not loaded: {sorted(from_pretrained)} do not apply to {name_or_path!r}")
        from moelens.zoo.tiny import build_tiny

        model, tokenizer = build_tiny(str(name_or_path)[len(TINY_PREFIX) :])
        model = model.to(dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = dict(dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code, **from_pretrained)
        try:
            with _loading_bars(progress):
                model = AutoModelForCausalLM.from_pretrained(checkpoint, **options)
            revision = {"revision": from_pretrained["revision"]} if "revision" in from_pretrained else {}
            tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code, **revision)
        except OSError as error:
            if isinstance(checkpoint, Path):
                raise
            raise ModelNotFoundError(
                f"hub id {checkpoint!r} could not be loaded: it is not in the local Hugging Face cache and the hub "
                f"could not provide it ({error}). Download it while online (`huggingface-cli download {checkpoint}`), "
                "check the id and revision, or pass a local checkpoint directory."
            ) from None
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    moe_layers(model)  # fail now, with the family-aware message, rather than at the first trace
    return model, tokenizer


@contextmanager
def _loading_bars(shown: bool) -> Iterator[None]:
    """Show or hide transformers' progress bars for the block, then restore the user's setting."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


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
