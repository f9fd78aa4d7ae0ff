"""The runnable examples in the docstrings of nnsqueeze.llm run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["gptq", "awq", "smoothquant", "sparsegpt", "wanda", "sequential", "tiny", "perplexity", "gemv",
           "packed", "offload"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(f"nnsqueeze.llm.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
