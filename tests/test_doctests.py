"""Every ``>>>`` example in nnsqueeze's docstrings runs and prints what it shows.

The modules are found by walking the package with :mod:`pkgutil` and reading each source file, so a
new module with an example is covered without editing this file. Each module is one test case; each
docstring in it starts from the same seeds, in a fresh temporary working directory, so an example
can write files and none are left behind.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsqueeze

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


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


def test_walk_finds_the_modules():
    # A guard on the walk itself: an import error in a package would silently shrink the list.
    assert len(MODULES) >= 90
    assert {"nnsqueeze.ops.quant", "nnsqueeze.structured.importance", "nnsqueeze.zoo.pylm"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module)
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
