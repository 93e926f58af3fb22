"""Shared fixtures: tiny models of the nine hand-configured families, built once per session."""

from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernel tests run under the interpreter, which triton reads once at import; transformers
# may import triton first (the conformance suite loads every MoE family's modeling code), so set it
# before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

from moelens.zoo.tiny import TINY_FAMILIES  # noqa: E402


@functools.cache
def _tiny(family: str):
    from moelens.zoo.tiny import build_tiny

    return build_tiny(family)


@pytest.fixture(params=TINY_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(family: str):
    """(model, tokenizer) of the family; shared across tests, so tests must leave it unchanged."""
    return _tiny(family)


PROMPTS = ["The quick brown fox", "def add(a, b):\n    return a + b", "12 + 7 = 19", "Bonjour"]
