"""One registry mechanism for every plug-in kind (steps, metrics, exporters, observers...).

A plug-in is a new file that registers itself by name; the runner never changes::

    from nnsqueeze.registry import STEPS

    @STEPS.register("my-step")
    class MyStep(Step): ...

``STEPS.get("nope")`` raises a :class:`RecipeError` that lists the accepted names.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from .errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        # Package whose modules register plug-ins; imported lazily on first lookup.
        self._package = package
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            try:
                obj.registered_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            pkg = importlib.import_module(self._package)
            for mod in getattr(pkg, "__all__", []):
                importlib.import_module(f"{self._package}.{mod}")

    def get(self, name: str, where: str = "") -> T:
        from .limits import quote

        self._load()
        if name not in self._items:
            raise RecipeError(
                where or self.kind,
                f"unknown {self.kind} {quote(name)}",
                fix=f"use one of: {', '.join(sorted(self._items))}",
            )
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


STEPS: Registry = Registry("step", "nnsqueeze.steps")
METRICS: Registry = Registry("metric", "nnsqueeze.metrics")
EXPORTERS: Registry = Registry("exporter", "nnsqueeze.export")
OBSERVERS: Registry = Registry("observer", "nnsqueeze.quant.observers")
# Stages after export that may replace the result (nnsqueeze.guard.Guard; the latency guard), and the
# replays of the records they append (record name -> replay(model, record) -> model) for nsq.load.
GUARDS: Registry = Registry("guard", "nnsqueeze.export")
REPLAYS: Registry = Registry("record", "nnsqueeze.export")
