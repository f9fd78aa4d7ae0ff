"""One registry mechanism for every plug-in kind (steps, metrics, exporters, observers...).

A plug-in is a new file that registers itself by name; the runner never changes::

    from nnsqueeze.registry import STEPS

    @STEPS.register("my-step")
    class MyStep(Step): ...

A registry names the module that holds its plug-ins and imports it on the first lookup. When that
is a package (``nnsqueeze.steps``, ``nnsqueeze.export``), every module in it is found with
:func:`pkgutil.iter_modules` and imported, so its ``@register`` runs: a new file in the package is
found with no list to edit (modules whose name starts with ``_`` are helpers and are skipped). When
it is a module (``nnsqueeze.metrics``, ``nnsqueeze.quant.observers``), importing it registers its
plug-ins. ``STEPS.get("nope")`` raises a :class:`RecipeError` that lists the accepted names::

    >>> from nnsqueeze.registry import STEPS
    >>> "prune" in STEPS and "quantize" in STEPS.names()
    True
"""

from __future__ import annotations

import importlib
import pkgutil
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
            for mod in plugin_modules(self._package):
                importlib.import_module(mod)

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


def plugin_modules(package: str) -> list[str]:
    """The modules a registry imports for ``package``: the package's own modules (not ``_private``
    ones, not subpackages' contents), sorted so the import order is the same everywhere; or the
    module itself when ``package`` is a plain module."""
    pkg = importlib.import_module(package)
    if not hasattr(pkg, "__path__"):
        return [package]
    return sorted(info.name for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}.")
                  if not info.name.rpartition(".")[2].startswith("_"))


STEPS: Registry = Registry("step", "nnsqueeze.steps")
METRICS: Registry = Registry("metric", "nnsqueeze.metrics")
EXPORTERS: Registry = Registry("exporter", "nnsqueeze.export")
OBSERVERS: Registry = Registry("observer", "nnsqueeze.quant.observers")
# Stages after export that may replace the result (nnsqueeze.guard.Guard; the latency guard), and the
# replays of the records they append (record name -> replay(model, record) -> model) for nsq.load.
GUARDS: Registry = Registry("guard", "nnsqueeze.export")
REPLAYS: Registry = Registry("record", "nnsqueeze.export")
