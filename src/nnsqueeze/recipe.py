"""Recipes: an ordered, validated, versioned list of steps, written in YAML or built in Python.

```yaml
version: 1
name: prune-int8
steps:
  - prune:    {method: magnitude, sparsity: 0.6, scope: global, schedule: gradual}
  - finetune: {epochs: 3, lr: 1.0e-3, optimizer: adamw}
  - quantize: {weights: {bits: 8}, activations: {bits: 8}, calibration: {method: minmax, samples: 512}}
export: {onnx: {opset: 17}}
```

``load_recipe`` accepts a path to YAML, a preset name (``nnsqueeze recipes`` lists them), a
:class:`Recipe`, a dict of the whole recipe, or a list of step dicts. Unknown keys, unknown steps
and wrong types raise :class:`RecipeError` naming the key, where it is, and the accepted values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError
from .limits import (MAX_DEPTH, MAX_RECIPE_BYTES, MAX_YAML_ALIASES, MAX_YAML_NODES, cap_threads, check_depth, clip,
                     quote, read_text)
from .registry import STEPS
from .step_config import StepConfig

FORMAT_VERSION = 1
PRESETS_DIR = Path(__file__).parent / "presets"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OnnxExportConfig(_Strict):
    opset: int = Field(17, ge=13, le=21, description="ONNX opset (13+ for per-channel int8)")
    verify: bool = Field(True, description="check ONNX Runtime's outputs against the torch model")
    atol: float | None = Field(None, gt=0, description="parity tolerance; default depends on the model")


class ExportConfig(_Strict):
    onnx: OnnxExportConfig | None = Field(default_factory=OnnxExportConfig)


class EvaluateConfig(_Strict):
    latency_batch: int | None = Field(None, ge=1, description="batch for latency; default: first eval batch")
    threads: int = Field(2, ge=1, description="intra-op threads for torch and ONNX Runtime timing")
    warmup: int = Field(5, ge=0)
    runs: int = Field(20, ge=1, description="timed runs; the median is reported")
    latency_budget_s: float | None = Field(30.0, gt=0, description="seconds one latency figure may take: when "
                                           "warmup + runs calls would take longer (a language model on long "
                                           "windows), one warm-up and as many runs as fit, at least 3; the "
                                           "report's latency_runs says how many ran. null: always warmup + runs")
    per_step: bool = Field(True, description="evaluate the metric after every step")
    torch_latency: bool = Field(True, description="time the torch model too (for fake-quant models: the "
                                "simulation's speed, not the deployed one); false skips it when an ONNX model is "
                                "timed in ONNX Runtime (search trials do: their objective is ONNX Runtime's)")

    @field_validator("threads")
    @classmethod
    def _cap_threads(cls, v: int) -> int:  # thousands of threads stall ONNX Runtime's session creation
        return cap_threads(v, "evaluate.threads")


class _RecipeFile(_Strict):
    version: int = FORMAT_VERSION
    name: str | None = None
    description: str | None = None
    seed: int = 0
    steps: list[dict[str, Any]] = Field(min_length=1)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    latency_guard: bool = Field(False, description="if the compressed ONNX model runs slower than the fp32 one in "
                                "ONNX Runtime, apply the fastest measured configuration that keeps the accuracy "
                                "(layers back to float, or the fp32 model); false: only report the offer")


@dataclass
class StepEntry:
    name: str
    config: StepConfig


@dataclass
class Recipe:
    steps: list[StepEntry]
    export: ExportConfig
    evaluate: EvaluateConfig
    name: str | None = None
    description: str | None = None
    seed: int = 0
    version: int = FORMAT_VERSION
    latency_guard: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in), as plain data."""
        return {
            "version": self.version, "name": self.name, "description": self.description, "seed": self.seed,
            "steps": [{s.name: s.config.model_dump(mode="json")} for s in self.steps],
            "export": self.export.model_dump(mode="json"), "evaluate": self.evaluate.model_dump(mode="json"),
            "latency_guard": self.latency_guard,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        check_depth(data, source, RecipeError)  # recipes passed as Python data, too
        if isinstance(data, list):
            data = {"steps": data}
        if not isinstance(data, dict):
            raise RecipeError(source, f"a recipe is a mapping with 'steps', got {type(data).__name__}",
                              fix="start the file with 'version: 1' and 'steps:'")
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise RecipeError(f"{source}: version", f"recipe format version {version} is newer than this "
                              f"nnsqueeze supports ({FORMAT_VERSION})", fix="upgrade nnsqueeze")
        try:
            top = _RecipeFile.model_validate(data)
        except ValidationError as e:
            raise _recipe_error(e, source) from None
        if top.version < 1:
            raise RecipeError(f"{source}: version", f"unknown recipe version {top.version}", fix="use version: 1")
        steps = []
        for i, item in enumerate(top.steps):
            where = f"{source}: steps[{i}]"
            if len(item) != 1:
                raise RecipeError(where, f"each step is a one-key mapping like '- prune: {{...}}', got keys "
                                  f"{quote(sorted(map(str, item)))}", fix=f"step names: {', '.join(STEPS.names())}")
            (name, cfg), = item.items()
            step_cls = STEPS.get(name, where=where)
            if cfg is None:
                cfg = {}
            if not isinstance(cfg, dict):
                raise RecipeError(f"{where}.{name}", f"step options must be a mapping, got {quote(cfg)}",
                                  fix=f"write '- {name}: {{}}' for defaults")
            try:
                config = step_cls.Config.model_validate(cfg)
            except ValidationError as e:
                raise _recipe_error(e, f"{where}.{name}", step_cls.Config) from None
            steps.append(StepEntry(name, config))
        return cls(steps=steps, export=top.export, evaluate=top.evaluate, name=top.name,
                   description=top.description, seed=top.seed, version=top.version,
                   latency_guard=top.latency_guard)


def _accepted(model: type[BaseModel] | None, loc: tuple) -> str:
    """Accepted keys at a location of a pydantic model, for 'extra key' errors."""
    cur: Any = model
    for part in loc[:-1]:
        if cur is None or not isinstance(part, str) or part not in getattr(cur, "model_fields", {}):
            return ""
        ann = cur.model_fields[part].annotation
        cur = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                   ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None)
    if cur is None:
        return ""
    return ", ".join(cur.model_fields)


def _recipe_error(e: ValidationError, source: str, model: type[BaseModel] | None = _RecipeFile) -> RecipeError:
    err = e.errors()[0]
    loc = tuple(err["loc"])
    path = source + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    if err["type"] == "extra_forbidden":
        keys = _accepted(model, loc)
        return RecipeError(clip(path), f"unknown key {quote(loc[-1])}", fix=f"accepted keys: {keys}" if keys else None)
    ctx = err.get("ctx") or {}
    fix = f"expected one of {ctx['expected']}" if "expected" in ctx else None
    more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    return RecipeError(clip(path), f"{err['msg']}, got {quote(err.get('input'))}{more}", fix=fix)


def presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    out = {}
    for p in sorted(PRESETS_DIR.glob("*.yaml")):
        data = parse_yaml(p.read_text(), f"preset {p.stem}")
        out[p.stem] = data.get("description", "")
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only) with bounded work: at most MAX_YAML_ALIASES aliases,
    MAX_YAML_NODES nodes once aliases are expanded (billion laughs), MAX_DEPTH levels of nesting
    (deeper would be a RecursionError), and duplicate keys refused (YAML would keep the last)."""

    source = "recipe"

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = self._aliases = 0

    def _fail(self, problem: str, fix: str, mark: Any = None) -> RecipeError:
        mark = mark or self.peek_event().start_mark
        return RecipeError(f"{self.source}:{mark.line + 1}:{mark.column + 1}", problem, fix=fix)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise self._fail(f"more than {MAX_YAML_ALIASES} YAML aliases", "write the values out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise self._fail(f"nested more than {MAX_DEPTH} levels deep", "flatten the recipe")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            sizes: dict[int, int | None] = {}

            def size(n: Any) -> int:  # nodes with aliases expanded; recursion is bounded by MAX_DEPTH
                if id(n) in sizes:
                    if sizes[id(n)] is None:
                        raise self._fail("an alias refers to a node containing it", "remove the cycle", n.start_mark)
                    return sizes[id(n)]
                sizes[id(n)] = None
                kids = [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else (
                    n.value if isinstance(n, yaml.SequenceNode) else [])
                total = 1
                for k in kids:
                    total += size(k)
                    if total > MAX_YAML_NODES:
                        raise self._fail(f"expands to more than {MAX_YAML_NODES:,} values through its aliases",
                                         "write the recipe out without nested aliases", n.start_mark)
                sizes[id(n)] = total
                return total

            size(node)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise self._fail(f"duplicate key {quote(key)}", "give each key once", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """Parse recipe YAML (or JSON, a subset of it) within the limits of :class:`_Loader`."""
    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters here already
        loader.source = source
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise RecipeError(where, f"malformed YAML: {clip(str(getattr(e, 'problem', None) or e))}",
                          fix="check indentation and colons") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise RecipeError(source, f"bad value: {clip(str(e))}", fix="check the numbers in the recipe") from None
    except RecursionError:  # a safety net: compose_node bounds the depth first
        raise RecipeError(source, "nested too deeply", fix="flatten the recipe") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_recipe(path: Path) -> Any:
    """A recipe file parsed within the limits: a regular UTF-8 file of at most MAX_RECIPE_BYTES."""
    return parse_yaml(read_text(path, MAX_RECIPE_BYTES, "recipe file", RecipeError), str(path))


def load_recipe(recipe: "Recipe | str | Path | dict | list") -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (dict, list)):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.exists():
                raise RecipeError(str(path), "recipe file not found",
                                  fix=f"give an existing YAML file or a preset: {', '.join(presets())}")
            return Recipe.from_dict(read_recipe(path), str(path))
        preset = PRESETS_DIR / f"{recipe}.yaml"
        if "/" not in str(recipe) and preset.is_file():
            return Recipe.from_dict(parse_yaml(preset.read_text(), f"preset {recipe}"), f"preset {recipe}")
        raise RecipeError(quote(str(recipe)), "neither a recipe file nor a preset name",
                          fix=f"presets: {', '.join(presets())}")
    raise RecipeError("recipe", f"cannot use a {type(recipe).__name__} as a recipe",
                      fix="pass a YAML path, a preset name, a Recipe, or a list of step dicts")
