"""Change notification for the widgets' state objects: a view observes its state and redraws."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Observable:
    """Observers, each called with the object after every change it reports with :meth:`_notify`."""

    def __init__(self) -> None:
        self._observers: list[Callable[[Any], None]] = []

    def observe(self, observer: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``observer(self)`` after every change; returns a function that stops the calls."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def _notify(self) -> None:
        for observer in list(self._observers):  # a copy: an observer may stop observing
            observer(self)
