"""Name -> function registries for the algorithm's pluggable parts (STYLE.md rule 5).

Every entry of a kind takes the same arguments, so the trainer never branches on a
name; an unknown name fails listing the choices; a duplicate name is an error.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self.entries[name] = fn
            return fn

        return add

    def __getitem__(self, name: str) -> F:
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self.entries)}")
        return self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)
