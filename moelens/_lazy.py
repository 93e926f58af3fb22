"""PEP 562 lazy attributes: keep package imports cheap by importing a module on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, namespace: dict[str, Any], names: Mapping[str, str | tuple[str, str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to the module that
    defines it, or to ``(module, attribute)`` when the public name differs. A resolved value is
    stored in ``namespace`` (the package's globals), so later lookups skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        target = names.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = (target, name) if isinstance(target, str) else target
        value = getattr(importlib.import_module(module), attribute)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*names, *(k for k in namespace if not k.startswith("_"))})

    return __getattr__, __dir__
