"""A tiny registry: a decorator usable bare or with a key, and a getter with a clear error."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from harness.errors import HarnessError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes or factories) of one kind.

    Example:
        MODELS = Registry("model")

        @MODELS.register("mlp")
        class MLP: ...

        MODELS.get("mlp")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | T | None = None) -> Callable[[T], T] | T:
        """Register under ``name`` (or the object's ``name`` attribute / ``__name__``)."""
        if name is not None and not isinstance(name, str):  # used bare: @REG.register
            obj = name
            self._add(getattr(obj, "name", None) or obj.__name__.lower(), obj)
            return obj

        def deco(obj: T) -> T:
            self._add(name or getattr(obj, "name", None) or obj.__name__.lower(), obj)
            return obj

        return deco

    def _add(self, key: str, obj: T) -> None:
        if key in self._items and self._items[key] is not obj:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._items[key] = obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; a HarnessError naming the choices otherwise."""
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items)) or "none"
            raise HarnessError(f"unknown {self.kind} {name!r} (choose from: {choices})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
