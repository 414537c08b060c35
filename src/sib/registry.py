"""A tiny name -> object registry shared by datasets, models, explainers, metrics and regularisers.

One registry key is the same string in code, config, CLI, tables and report headings (timm style),
and an unknown name raises an error that lists the valid ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists the valid names."""


class Registry(Generic[T]):
    """Maps names to objects; entries may be given lazily as "module:attribute" strings.

    Args:
        kind: what the registry holds, used in error messages ("dataset", "explainer", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """Register `obj` under `name`; without `obj`, return a decorator."""
        if obj is not None:
            self._add(name, obj)
            return None

        def decorator(o: T) -> T:
            self._add(name, o)
            return o

        return decorator

    def _add(self, name: str, obj: T | str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """Return the entry for `name`, importing it if it was registered lazily."""
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries))
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def resolve_names(requested: list[str], registry: Registry) -> list[str]:
    """Expand "all" and validate names against a registry (unknown names list the valid ones).

    For the name lists commands are given (`--methods all`); here, beside the registries, so that `sib explain`
    and `sib evaluate` share it without one command importing the other."""
    names = registry.names() if requested == ["all"] else list(requested)
    for n in names:
        registry.get(n)
    return names
