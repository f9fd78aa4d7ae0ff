"""Every name a benchmark script imports from nnsqueeze exists.

The scripts under ``bench/`` run only when someone re-measures BENCHMARKS.md, so a refactor that
moves a name breaks them silently (``bench/minilm.py`` imported a helper that had moved, and failed
after computing for minutes). This reads each script's imports with ``ast`` and resolves them; it
runs no benchmark.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def _nnsqueeze_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for every ``from nnsqueeze... import name`` / ``import nnsqueeze...``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "nnsqueeze":
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "nnsqueeze"]
    return out


def test_there_are_bench_scripts():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bench_imports_resolve(path):
    missing = []
    for line, module, name in _nnsqueeze_imports(path):
        mod = importlib.import_module(module)
        if name is None or name == "*" or hasattr(mod, name):
            continue
        try:  # `from package import submodule`
            importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError:
            missing.append(f"{path.name}:{line}: `{name}` is not in {module}")
    assert not missing, "\n".join(missing)
