"""Plug-in discovery: registries find their modules with pkgutil, so a new step file needs no list."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import nnsqueeze
import nnsqueeze.export
import nnsqueeze.steps
from nnsqueeze.errors import RecipeError
from nnsqueeze.registry import EXPORTERS, METRICS, OBSERVERS, STEPS, Registry, plugin_modules

SRC = str(Path(nnsqueeze.__file__).resolve().parents[1])   # the tree these tests import

# A step module dropped into nnsqueeze.steps (through an extra, temporary package path), and a
# private helper next to it that must not be imported (it would fail loudly if it were).
PROBE_STEP = textwrap.dedent('''
    from nnsqueeze.registry import STEPS
    from nnsqueeze.steps.base import Step, StepConfig

    class ProbeConfig(StepConfig):
        factor: float = 1.0

    @STEPS.register("probe-scale")
    class ProbeScale(Step):
        Config = ProbeConfig
        default_targets = ["Linear"]

        def run(self, model, ctx):
            return model
''')

CHILD = textwrap.dedent('''
    import json, sys
    import nnsqueeze.steps
    nnsqueeze.steps.__path__.append(sys.argv[1])   # the temporary package path, searched after the built-ins
    from nnsqueeze.recipe import load_recipe
    from nnsqueeze.registry import STEPS
    recipe = load_recipe([{"probe-scale": {"factor": 2.0}}])
    print(json.dumps({"names": STEPS.names(), "step": recipe.steps[0].name,
                      "factor": recipe.steps[0].config.factor,
                      "module": STEPS.get("probe-scale").__module__,
                      "helper_imported": "nnsqueeze.steps._probe_helper" in sys.modules}))
''')


def _module_files(pkg) -> set[str]:
    """Names of the non-private ``.py`` modules in ``pkg``'s directory, read from the file system."""
    (d,) = pkg.__path__
    return {f"{pkg.__name__}.{p.stem}" for p in Path(d).glob("*.py") if not p.stem.startswith("_")}


def test_a_step_file_dropped_in_the_package_is_found_and_usable_in_a_recipe():
    # A subprocess, so the probe step never joins this process's STEPS; the directory is removed after.
    with tempfile.TemporaryDirectory() as d:
        Path(d, "probe_scale.py").write_text(PROBE_STEP)
        Path(d, "_probe_helper.py").write_text("raise RuntimeError('private helper modules are not plug-ins')\n")
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run([sys.executable, "-c", CHILD, d], capture_output=True, text=True, env=env,
                             timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["step"] == "probe-scale" and got["factor"] == 2.0
    assert got["module"] == "nnsqueeze.steps.probe_scale"
    assert not got["helper_imported"]
    # Every built-in step is still there, next to the new one.
    assert set(got["names"]) == set(STEPS.names()) | {"probe-scale"}
    assert not Path(d).exists()


def test_every_step_and_exporter_module_is_imported():
    # The discovery list is the package directory itself, nothing hand-written.
    assert set(plugin_modules("nnsqueeze.steps")) == _module_files(nnsqueeze.steps)
    assert set(plugin_modules("nnsqueeze.export")) == _module_files(nnsqueeze.export)
    assert plugin_modules("nnsqueeze.steps") == sorted(plugin_modules("nnsqueeze.steps"))
    STEPS.names()
    EXPORTERS.names()
    for mod in plugin_modules("nnsqueeze.steps") + plugin_modules("nnsqueeze.export"):
        assert mod in sys.modules
    assert not hasattr(nnsqueeze.steps, "__all__") and not hasattr(nnsqueeze.export, "__all__")


def test_registered_names():
    # The names the hand-written lists gave, unchanged by discovery (plus llm/export.py's exporter, moved in).
    assert STEPS.names() == ["awq", "cluster", "distill", "finetune", "gptq", "group-lasso", "half", "lowrank",
                             "mixed", "mixed-int8", "nm-prune", "prune", "qat", "quantize", "quantize-dynamic",
                             "rotate", "rtn", "share", "smoothquant", "sparsegpt", "structured-prune", "wanda",
                             "weight-only"]
    assert EXPORTERS.names() == ["compressed-tensors", "gguf", "gptq", "onnx", "onnx-causal-lm"]
    assert OBSERVERS.names() == ["ema-minmax", "ema-minmax-0.1", "kl", "minmax", "mse", "percentile",
                                 "percentile-99.9", "percentile-99.99", "percentile-99.999"]
    assert METRICS.names() == ["accuracy", "agreement", "cosine", "perplexity"]


def test_a_plain_module_registry_imports_that_module():
    assert plugin_modules("nnsqueeze.metrics") == ["nnsqueeze.metrics"]
    assert plugin_modules("nnsqueeze.quant.observers") == ["nnsqueeze.quant.observers"]
    assert [m.name for m in pkgutil.iter_modules(nnsqueeze.steps.__path__) if m.name == "_llm"] == ["_llm"]
    assert "nnsqueeze.steps._llm" not in plugin_modules("nnsqueeze.steps")


def test_unknown_name_lists_the_accepted_ones():
    with pytest.raises(RecipeError) as e:
        STEPS.get("prnue", where="steps[0]")
    assert e.value.where == "steps[0]" and "prune" in e.value.fix and "quantize" in e.value.fix


def test_a_name_registers_once():
    reg: Registry = Registry("thing")
    reg.register("a")(int)
    reg.register("a")(int)          # the same object again: fine (a module imported twice)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(float)
    assert reg.names() == ["a"] and reg.get("a") is int
