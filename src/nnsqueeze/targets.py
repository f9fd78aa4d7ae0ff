"""Layer selection, the same in every step: ``targets`` and ``ignore`` patterns.

A pattern is one of
- a class name (``Linear``, ``Conv2d``): matches modules of that class (exact class name);
- an exact module name (``features.0``, ``classifier``);
- ``re:<regex>``: a regex that must match the whole module name (``re:features\\.[0-2]``).

    >>> from torch import nn
    >>> from nnsqueeze.targets import select
    >>> model = nn.Sequential()
    >>> model.add_module("conv", nn.Conv1d(1, 4, 3))
    >>> model.add_module("act", nn.ReLU())
    >>> model.add_module("body", nn.Sequential(nn.Flatten(), nn.Linear(8, 8), nn.Conv1d(4, 4, 1)))
    >>> model.add_module("head", nn.Linear(8, 2))
    >>> sel = select(model, ["Linear", "Conv1d"], ignore=["re:.*head.*"], supported=(nn.Linear, nn.Conv1d))
    >>> sel.names, sel.skipped
    (['conv', 'body.1', 'body.2'], [('head', 'ignored by recipe')])
    >>> select(model, ["act", "body.1"], supported=(nn.Linear,)).skipped
    [('act', 'ReLU is not supported by this step')]

A pattern that matches nothing is an error (a typo should never silently do nothing).
Modules that match a target but cannot be handled are returned as ``skipped`` with a reason,
so the caller can log them and list them in the report.

    >>> select(model, ["Conv2d"])
    Traceback (most recent call last):
    ...
    nnsqueeze.errors.TargetError: targets: pattern 'Conv2d' matches no module of Sequential
      fix: use a class name (...) or 're:<regex>'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .errors import TargetError


def pattern_matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


@dataclass
class Selection:
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.layers]


def _check_patterns(patterns: list[str], where: str) -> None:
    for p in patterns:
        if not isinstance(p, str) or not p or p == "re:":
            raise TargetError(where, f"invalid pattern {p!r}", fix="use a class name, a module name or 're:<regex>'")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise TargetError(where, f"bad regex {p!r}: {e}", fix="escape dots as '\\.'") from None


def select(
    model: nn.Module,
    targets: list[str],
    ignore: list[str] | None = None,
    supported: tuple[type, ...] = (),
    where: str = "targets",
    strict: bool = True,
) -> Selection:
    """Modules matched by ``targets``, minus ``ignore``, restricted to ``supported`` types.

    Containers that merely hold matched children are not selected themselves unless they are
    of a supported type. Raises :class:`TargetError` if a target or ignore pattern matches nothing.
    """
    ignore = ignore or []
    _check_patterns(targets, where)
    _check_patterns(ignore, where.replace("targets", "ignore"))
    modules = [(n, m) for n, m in model.named_modules() if n]
    for p in targets if strict else ():
        if not any(pattern_matches(p, n, m) for n, m in modules):
            names = ", ".join(n for n, _ in modules[:8])
            raise TargetError(
                where, f"pattern {p!r} matches no module of {type(model).__name__}",
                fix=f"use a class name ({', '.join(sorted({type(m).__name__ for _, m in modules})[:8])}), "
                f"a module name ({names}...) or 're:<regex>'",
            )
    for p in ignore:
        if not any(pattern_matches(p, n, m) for n, m in modules):
            raise TargetError(where.replace("targets", "ignore"), f"ignore pattern {p!r} matches no module",
                              fix="remove it or fix the name; `nnsqueeze` lists module names in errors like this one")
    sel = Selection()
    for name, mod in modules:
        if not any(pattern_matches(p, name, mod) for p in targets):
            continue
        if any(pattern_matches(p, name, mod) for p in ignore):
            sel.skipped.append((name, "ignored by recipe"))
        elif supported and not isinstance(mod, supported):
            # Only report leaves the user named explicitly; containers are silently walked through.
            if not list(mod.children()):
                sel.skipped.append((name, f"{type(mod).__name__} is not supported by this step"))
        else:
            sel.layers.append((name, mod))
    return sel


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``model`` by ``new``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
