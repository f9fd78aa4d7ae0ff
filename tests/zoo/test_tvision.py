"""zoo/tvision.py: torchvision's models and transformers' models import beside the CPU torch, whichever
torchvision build pip installed (PyPI's x86-64 wheel is a CUDA build whose compiled ops cannot load here)."""

from __future__ import annotations

import subprocess
import sys

import torch

from nnsqueeze.zoo.tvision import import_torchvision, prepare


def test_torchvision_models_build_and_run():
    tv = import_torchvision()
    torch.manual_seed(0)
    net = tv.models.get_model("resnet18", weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    y = net(x)
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
    # no compiled op in the forward: every sample is independent of the others (eval-mode BatchNorm)
    assert torch.allclose(net(x[1:]), y[1:], atol=1e-5)


def test_prepare_is_a_no_op_once_torchvision_is_imported():
    import_torchvision()
    assert prepare() is False


def test_transformers_models_import_after_nnsqueeze_in_a_fresh_process():
    # transformers imports torchvision for BertModel; a torchvision that half-imports breaks it
    code = ("import nnsqueeze, torchvision\n"
            "from transformers import BertConfig, BertModel\n"
            "cfg = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=9)\n"
            "m = BertModel(cfg)\n"
            "print(type(m).__name__, torchvision.models.resnet18().fc.out_features)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["BertModel", "1000"]
