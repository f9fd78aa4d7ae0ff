"""``qat`` with residual adds (``ops: [add]``, fixed calibrated activation grids), then ``distill``
on batches with no targets at all (label-free: the loss is the KL to the fp32 teacher alone). The
trained model still runs all-integer in ONNX Runtime (every residual add a QLinearAdd tied to its
producers, no float Conv/Add, no requantizing DequantizeLinear/QuantizeLinear pair beyond the
post-training ``int8-residual`` graph's) and equals the torch simulation within the export's
tolerance; distillation moved the weights away from the post-training ones."""

from __future__ import annotations

from collections import Counter

import torch
import yaml
from test_quantize_mobile_ops import N_ADDS, TFMobile, trained_bn
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.export.ort import optimized_op_types
from nnsqueeze.recipe import PRESETS_DIR, load_recipe

FAST = {"evaluate": {"warmup": 0, "runs": 1, "threads": 1, "per_step": False}}
QAT = {"weights": {"bits": 8, "granularity": "per-channel", "symmetric": True},
       "activations": {"bits": 8, "granularity": "per-tensor", "symmetric": False},
       "calibration": {"method": "minmax", "samples": 512}, "ops": ["add"], "bn": "static", "lsq": False,
       "bias_correction": True}  # before training: exactly the int8-residual preset's model


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = TFMobile()
    trained_bn(model)
    return model.eval()


def _ops(res, x, tmp_path, name) -> Counter:
    path = tmp_path / f"{name}.onnx"
    nsq.export_onnx(res, path, example_inputs=x)
    return Counter(optimized_op_types(path.read_bytes()))


def test_label_free_distill_after_qat_with_adds_stays_all_integer(tmp_path):
    g = torch.Generator().manual_seed(3)
    train = [(torch.randn(8, 3, 33, 31, generator=g), None) for _ in range(4)]  # no labels
    calib = [(torch.randn(16, 3, 33, 31, generator=g), None) for _ in range(2)]
    x = calib[0][0][:4]
    steps = [{"qat": QAT}, {"distill": {"steps": 6, "lr": 1e-3, "alpha": 0.0, "temperature": 1.0}}]
    res = nsq.compress(_model(), load_recipe({"version": 1, "steps": steps, **FAST}), train_data=train,
                       calib_data=calib, example_inputs=x, metric=None, progress=False)
    ptq = nsq.compress(_model(), load_recipe({**yaml.safe_load((PRESETS_DIR / "int8-residual.yaml").read_text()),
                                              **FAST}), calib_data=calib, example_inputs=x, metric=None,
                       progress=False)
    exp = res.report["export"]["compressed"]
    assert exp["ort_int8_ops"] and exp["max_abs_diff"] <= exp["tolerance"]
    ops, ptq_ops = _ops(res, x, tmp_path, "qat"), _ops(ptq, x, tmp_path, "ptq")
    assert ops["QLinearAdd"] == N_ADDS and ops["Add"] == 0 and ops["Conv"] == 0
    assert ops["QLinearConv"] == sum(isinstance(m, nn.Conv2d) for m in _model().modules())
    # the same graph as post-training int8-residual: no extra requantization between kernels
    assert ops == ptq_ops, (ops, ptq_ops)
    assert res.report["steps"][-1]["name"] == "distill" and res.report["steps"][-1]["figures"]["steps"] == 6
    trained = dict(res.model.named_parameters())
    moved = [n for n, p in ptq.model.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert moved, "distillation on label-free batches changed no weight"
