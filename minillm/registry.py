"""A tiny registry with lazy ``"module:attr"`` entries and "did you mean …?" errors.

Why: criteria (LLM, CNN, LSTM) each live in one file and join with one registry line, and importing
the registry must not import every criterion's dependencies. Modelled on lm-eval's registries.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the choices and a suggestion."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects given as ``"package.module:attribute"`` strings, imported on first use."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, str] = {}
        self._summaries: dict[str, str] = {}
        self._loaded: dict[str, T] = {}

    def register(self, name: str, target: str, summary: str = "") -> None:
        """Add ``name``; ``summary`` is the one line that listings (``minillm criteria``) show for it."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target
        self._summaries[name] = summary

    def summary(self, name: str) -> str:
        return self._summaries.get(name, "")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Choose one of: {', '.join(self.names())}"
            )
        if name not in self._loaded:
            module_name, attr = self._entries[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module_name), attr)
        return self._loaded[name]
