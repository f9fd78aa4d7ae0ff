"""The runnable examples in the structured-pruning module docstrings."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["nnsqueeze.structured.graph", "nnsqueeze.structured.rules", "nnsqueeze.structured.pruners",
           "nnsqueeze.structured.allocate", "nnsqueeze.structured.spaces",
           "nnsqueeze.structured.resolve", "nnsqueeze.structured.permute",
           "nnsqueeze.structured.macs", "nnsqueeze.structured.collect", "nnsqueeze.structured.nm",
           "nnsqueeze.structured.shapes", "nnsqueeze.structured.xgraph", "nnsqueeze.structured.xattn",
           "nnsqueeze.structured.attention", "nnsqueeze.structured.window_attention", "nnsqueeze.structured.heads",
           "nnsqueeze.structured.importance",
           "nnsqueeze.structured.importance.l1", "nnsqueeze.structured.importance.l2",
           "nnsqueeze.structured.importance.fpgm", "nnsqueeze.structured.importance.bn_scale",
           "nnsqueeze.structured.importance.taylor", "nnsqueeze.structured.importance.activation",
           "nnsqueeze.steps.channel_prune", "nnsqueeze.steps.nm_prune", "nnsqueeze.steps.group_lasso"]


@pytest.mark.parametrize("name", MODULES + ["nnsqueeze.structured.hf", "nnsqueeze.structured.hidden"])
def test_docstring_examples(name):
    if name.endswith((".hf", ".hidden")):
        pytest.importorskip("transformers")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
