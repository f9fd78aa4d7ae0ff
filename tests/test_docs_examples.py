"""The ``>>>`` examples of the Markdown pages in ``docs/`` run and print what they show, and every
other Python block there says it is a sketch.

Same flags and seeds as :mod:`tests.test_doctests` (the docstring examples); each page runs in its
own empty temporary working directory, so an example may write files and none are left behind. The
code fences are blanked before parsing, so a closing fence is never read as expected output.
"""

from __future__ import annotations

import doctest
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
FENCE = re.compile(r"^```.*$", re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
PAGES = sorted(p.name for p in DOCS.glob("*.md") if ">>>" in p.read_text(encoding="utf-8"))


def test_pages_with_examples_are_found():
    assert "architecture.md" in PAGES


@pytest.mark.parametrize("page", PAGES)
def test_page_examples(page, tmp_path, monkeypatch):
    text = FENCE.sub("", (DOCS / page).read_text(encoding="utf-8"))
    test = doctest.DocTestParser().get_doctest(text, {}, page, str(DOCS / page), 0)
    assert test.examples
    monkeypatch.chdir(tmp_path)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


@pytest.mark.parametrize("page", ["architecture.md"])
def test_python_blocks_run_or_say_sketch(page):
    blocks = PYTHON_BLOCK.findall((DOCS / page).read_text(encoding="utf-8"))
    assert blocks
    for block in blocks:
        assert block.startswith(">>>") or block.startswith("# Sketch"), block[:80]
