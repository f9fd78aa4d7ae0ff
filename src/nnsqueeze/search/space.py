"""Search spaces: which recipe fields a search varies, and how (YAML, validated, versioned).

```yaml
version: 1
name: cnn
base:                                  # a recipe's steps: every field not searched keeps this value
  - prune: {sparsity: 0.5}
  - finetune: {epochs: 2, lr: 5.0e-4}
  - quantize: {weights: {bits: 8, clip: mse}}
params:
  prune: {optional: true}              # the step is on or off
  prune.sparsity: [0.3, 0.9]           # a float range (int range when both bounds are integers)
  finetune.epochs: {int: [1, 5]}
  finetune.lr: {log: [1.0e-4, 1.0e-2]} # log-uniform float range
  quantize.weights.bits: {choices: [4, 8]}
  quantize.weights.clip: {optional: true}  # a field of base switched on or off (off: its default)
evaluate: {runs: 20, warmup: 5}        # the recipe's evaluate / export / seed, for every trial
```

A key is ``STEP.FIELD[.SUBFIELD...]``; a step that appears twice in ``base`` is named ``STEP#N``
(N-th occurrence, from 1). Each trial becomes a concrete recipe (:meth:`Space.recipe`), checked by
the recipe loader before it runs. :func:`load_space` accepts a YAML path, a shipped space name
(``cnn``, ``encoder``, ``llm``), a dict or a :class:`Space`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RecipeError
from ..recipe import Recipe, parse_yaml

SPACE_VERSION = 1
SPACES_DIR = Path(__file__).resolve().parent.parent / "presets" / "search"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One searched field: exactly one of ``float``/``int``/``log``/``choices``, or ``optional``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # float_/int_: written float/int in YAML (the trailing _ keeps the builtins usable here)
    float_: list[float] | None = Field(None, alias="float", min_length=2, max_length=2, description="[low, high]")
    int_: list[int] | None = Field(None, alias="int", min_length=2, max_length=2,
                                   description="[low, high], both included")
    log: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high], log-uniform")
    choices: list[Any] | None = Field(None, min_length=1)
    step: float | None = Field(None, gt=0, description="grid step of a float or int range")
    optional: bool | None = Field(None, description="the step or field is switched on or off (off: the step is "
                                  "dropped, or the field removed so its default applies)")

    @model_validator(mode="after")
    def _one_kind(self) -> "Param":
        kinds = [k.rstrip("_") for k in _KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of float, int, log, choices, optional (got {kinds or 'none'})")
        lo_hi = self.float_ or self.int_ or self.log
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"the range's low bound must be below its high bound, got {lo_hi}")
        if self.log is not None and self.log[0] <= 0:
            raise ValueError(f"a log range needs positive bounds, got {self.log}")
        if self.step is not None and self.float_ is None and self.int_ is None:
            raise ValueError("step applies to float and int ranges only")
        return self

    @property
    def kind(self) -> str:
        return next(k.rstrip("_") for k in _KINDS if getattr(self, k) is not None)

    def values(self) -> list[Any]:
        """Representative values (the bounds, or every choice) to check against the step's config."""
        if self.choices is not None:
            return list(self.choices)
        if self.optional is not None:
            return [True, False]
        return list(self.float_ or self.int_ or self.log)


_KINDS = ("float_", "int_", "log", "choices", "optional")


class _SpaceFile(_Strict):
    version: int = SPACE_VERSION
    name: str | None = None
    description: str | None = None
    base: list[dict[str, Any]] = Field(min_length=1, description="the recipe's steps")
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    evaluate: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] | None = None
    latency_guard: bool = False


def _short(v: Any) -> Any:
    """``[lo, hi]`` is a range: int when both bounds are integers, else float."""
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return {"int": v} if all(isinstance(x, int) for x in v) else {"float": v}
    return v


class Space:
    """A validated search space: the base recipe, the searched params, and the trial -> recipe mapping."""

    def __init__(self, data: Any, source: str = "space"):
        if not isinstance(data, dict):
            raise RecipeError(source, f"a search space is a mapping with 'base' and 'params', got "
                              f"{type(data).__name__}", fix="start the file with 'version: 1', 'base:' and 'params:'")
        if isinstance(data.get("version"), int) and data["version"] != SPACE_VERSION:
            raise RecipeError(f"{source}: version", f"unknown search space version {data['version']}",
                              fix=f"use version: {SPACE_VERSION}" + (" or upgrade nnsqueeze"
                                                                     if data["version"] > SPACE_VERSION else ""))
        try:
            top = _SpaceFile.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = source + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise RecipeError(loc, f"unknown key {err['loc'][-1]!r}",
                                  fix="accepted keys: " + ", ".join(_SpaceFile.model_fields)) from None
            raise RecipeError(loc, err["msg"]) from None
        self.raw = data
        self.source, self.name, self.description, self.seed = source, top.name, top.description, top.seed
        self.base, self.evaluate, self.export = top.base, top.evaluate, top.export
        self.latency_guard = top.latency_guard
        self.keys = self._step_keys()
        self.params: dict[str, Param] = {}
        for key, raw in top.params.items():
            try:
                self.params[key] = Param.model_validate(_short(raw))
            except ValidationError as e:
                err = e.errors()[0]
                msg = f"unknown key {err['loc'][-1]!r}" if err["type"] == "extra_forbidden" else \
                    err["msg"].removeprefix("Value error, ")
                raise RecipeError(f"{source}: params.{key}", msg,
                                  fix="e.g. [0.3, 0.9], {int: [1, 5]}, {log: [1.0e-4, 1.0e-2]}, {choices: [4, 8]} "
                                  "or {optional: true}") from None
        if not self.params:
            raise RecipeError(f"{source}: params", "the space searches nothing (no params)",
                              fix="add e.g. 'prune.sparsity: [0.3, 0.9]' under params")
        for key, p in self.params.items():
            i, fields = self._locate(key, p)
            if p.optional is not None and fields and not self._in_base(i, fields):
                raise RecipeError(f"{self.source}: params.{key}", "an optional field must be set in base (its "
                                  "value when on); it is not", fix=f"give {'.'.join(fields)} a value in base's "
                                  f"{self.keys[i]} step")
        self._check()

    # ------------------------------------------------------------------ keys

    def _step_keys(self) -> list[str]:
        """``name`` per base step, or ``name#N`` for a name used more than once."""
        names = []
        for i, item in enumerate(self.base):
            if not isinstance(item, dict) or len(item) != 1:
                raise RecipeError(f"{self.source}: base[{i}]", "each step is a one-key mapping like '- prune: {...}'")
            names.append(next(iter(item)))
        seen: dict[str, int] = {}
        keys = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            keys.append(f"{n}#{seen[n]}" if names.count(n) > 1 else n)
        return keys

    def _locate(self, key: str, p: Param) -> tuple[int, list[str]]:
        """The base step index and field path a param key names."""
        step, _, path = key.partition(".")
        if step not in self.keys:
            hint = [k for k in self.keys if k.split("#")[0] == step]
            raise RecipeError(f"{self.source}: params.{key}", f"no step {step!r} in base" +
                              (f" ({step} appears more than once: name it {' or '.join(hint)})" if hint else ""),
                              fix=f"steps in base: {', '.join(self.keys)}")
        fields = path.split(".") if path else []
        if p.optional is None and not fields:
            raise RecipeError(f"{self.source}: params.{key}", "a step key takes only {optional: true}",
                              fix=f"name a field, e.g. '{step}.<field>: [low, high]'")
        return self.keys.index(step), fields

    def _in_base(self, i: int, fields: list[str]) -> bool:
        cfg = next(iter(self.base[i].values())) or {}
        for f in fields:
            if not isinstance(cfg, dict) or f not in cfg:
                return False
            cfg = cfg[f]
        return True

    # ------------------------------------------------------------------ trial -> recipe

    def recipe_dict(self, values: dict[str, Any]) -> dict[str, Any]:
        """The concrete recipe (a plain dict) for ``values`` (param key -> value; missing optional
        steps are on, missing fields keep their base value)."""
        steps = [copy.deepcopy(s) for s in self.base]
        keep = [True] * len(steps)
        for key, p in self.params.items():
            if key not in values:
                continue
            i, fields = self._locate(key, p)
            if p.optional is not None and not fields:
                keep[i] = bool(values[key])
                continue
            if p.optional is not None:  # an optional field: off removes it (its default applies), on keeps base
                if not values[key]:
                    (name, cfg), = steps[i].items()
                    cfg = steps[i][name] = dict(cfg or {})
                    for f in fields[:-1]:
                        if not isinstance(cfg.get(f), dict):
                            break
                        cfg[f] = dict(cfg[f])
                        cfg = cfg[f]
                    else:
                        cfg.pop(fields[-1], None)
                continue
            (name, cfg), = steps[i].items()
            cfg = steps[i][name] = dict(cfg or {})
            for f in fields[:-1]:
                sub = cfg.get(f)
                cfg[f] = dict(sub) if isinstance(sub, dict) else {}
                cfg = cfg[f]
            cfg[fields[-1]] = values[key]
        out: dict[str, Any] = {"version": 1, "name": f"{self.name or 'search'}-trial", "seed": self.seed,
                               "steps": [s for s, k in zip(steps, keep) if k], "evaluate": self.evaluate,
                               "latency_guard": self.latency_guard}
        if self.export is not None:
            out["export"] = self.export
        return out

    def recipe(self, values: dict[str, Any]) -> Recipe:
        """:meth:`recipe_dict`, validated by the recipe loader (RecipeError when it does not hold)."""
        if not any(True for _ in self.recipe_dict(values)["steps"]):
            raise RecipeError(self.source, "every step is switched off", fix="keep at least one step on")
        from ..pipeline import make_steps

        recipe = Recipe.from_dict(self.recipe_dict(values), f"{self.source} trial")
        make_steps(recipe)  # step order and training needs, as compress checks them
        return recipe

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample the values of one optuna trial (fields of a switched-off step are not sampled)."""
        values: dict[str, Any] = {}
        off: list[str] = []  # optional steps and fields switched off: nothing under them is sampled

        def under_off(key: str) -> bool:
            return any(key.startswith(o + ".") for o in off)

        for key, p in sorted(self.params.items(), key=lambda kv: kv[0].count(".")):  # parents first
            if p.optional is not None and not under_off(key):
                values[key] = trial.suggest_categorical(key, [True, False])
                if not values[key]:
                    off.append(key)
        for key, p in self.params.items():
            if p.optional is not None or under_off(key):
                continue
            if p.choices is not None:
                values[key] = trial.suggest_categorical(key, p.choices)
            elif p.int_ is not None:
                values[key] = trial.suggest_int(key, p.int_[0], p.int_[1], step=int(p.step or 1))
            elif p.log is not None:
                values[key] = trial.suggest_float(key, p.log[0], p.log[1], log=True)
            else:
                values[key] = trial.suggest_float(key, p.float_[0], p.float_[1], step=p.step)
        return values

    def check_values(self, values: Any, where: str) -> dict[str, Any]:
        """``values`` (param key -> value, e.g. a trial to enqueue) as valid for this space: every key
        a param, every value one the param can take; RecipeError naming the first that is not."""
        if not isinstance(values, dict) or not values:
            raise RecipeError(where, f"expected a mapping of param -> value, got {values!r}",
                              fix=f"e.g. {{{next(iter(self.params), 'prune.sparsity')}: ...}}")
        out: dict[str, Any] = {}
        for key, v in values.items():
            p = self.params.get(key)
            if p is None:
                raise RecipeError(f"{where}: {key}", "not a param of the space",
                                  fix=f"params: {', '.join(self.params) or 'none'}")
            if p.optional is not None or p.choices is not None:
                allowed = [True, False] if p.optional is not None else p.choices
                if not any(v == a and type(v) is type(a) for a in allowed):
                    raise RecipeError(f"{where}: {key}", f"{v!r} is not one of {allowed}", fix="use one of them")
            else:
                lo, hi = p.float_ or p.int_ or p.log
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                if p.int_ is not None:
                    ok = ok and float(v).is_integer()
                if not ok or not lo <= v <= hi:
                    raise RecipeError(f"{where}: {key}", f"{v!r} is outside the param's range [{lo}, {hi}]",
                                      fix=f"give a {'whole ' if p.int_ is not None else ''}number in [{lo}, {hi}]")
                v = int(v) if p.int_ is not None else float(v)
            out[key] = v
        self.recipe(out)  # the values must also make a valid recipe
        return out

    # ------------------------------------------------------------------ checks

    def _check(self) -> None:
        """Reject a contradictory space before any trial: every value each param can take must
        make a valid recipe with the rest at base (or all optional steps on), and at least one
        step must stay on."""
        optional = [k for k, p in self.params.items() if p.optional is not None and "." not in k]
        if len(optional) == len(self.base):
            raise RecipeError(f"{self.source}: params", "every step in base is optional, so a trial could run no "
                              "step at all", fix="make at least one step mandatory (drop its 'optional: true')")
        self.recipe({})  # the base with every optional step on
        for key, p in self.params.items():
            for v in p.values():
                if isinstance(v, float) and not math.isfinite(v):
                    raise RecipeError(f"{self.source}: params.{key}", f"{v} is not a finite number")
                try:
                    self.recipe({key: v})
                except RecipeError as e:
                    raise RecipeError(f"{self.source}: params.{key}", f"the value {v!r} makes an invalid recipe: "
                                      f"{e.where}: {e.problem}",
                                      fix=e.fix or "narrow the range or the choices") from None


def load_space(space: "Space | str | Path | dict") -> Space:
    """A :class:`Space` from a YAML path, a shipped space name, a dict, or a Space."""
    if isinstance(space, Space):
        return space
    if isinstance(space, dict):
        return Space(space)
    if isinstance(space, (str, Path)):
        path = Path(space)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise RecipeError(str(path), "search space file not found",
                                  fix=f"give an existing YAML file or a shipped space: {', '.join(spaces())}")
            return Space(parse_yaml(path.read_text(), str(path)), str(path))
        shipped = SPACES_DIR / f"{space}.yaml"
        if shipped.is_file():
            return Space(parse_yaml(shipped.read_text(), f"space {space}"), f"space {space}")
        raise RecipeError(str(space), "neither a search space file nor a shipped space name",
                          fix=f"shipped spaces: {', '.join(spaces())}")
    raise RecipeError("space", f"cannot use a {type(space).__name__} as a search space",
                      fix="pass a YAML path, a shipped space name or a dict")


def spaces() -> list[str]:
    """Names of the shipped search spaces."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
