"""QAT under data parallelism: a real 2-rank torchrun run of ``qat`` (LSQ, BN folded on the fly,
grid penalty) + ``finetune`` against a single-process reference on the union of the ranks' batches,
and the pieces that make the two equal (synced BN statistics, LSQ's activation gradient scale)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.ops.lsq import lsq_fake_quantize, lsq_grad_scale
from nnsqueeze.quant.modules import ACT_QMAX, ACT_QMIN
from nnsqueeze.steps.qat import Qat, lsq_world_scale_hooks

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
try:
    import ddp_qat_worker as worker
finally:
    sys.path.remove(str(ROOT / "tests"))


def _qat_prepared():
    """The worker's net after the qat step alone (calibrated scales, LSQ parameters, BNs attached)."""
    cfg = worker.RECIPE["steps"][0]["qat"]
    ctx = Context(train_data=worker.make_batches(), calib_data=worker.make_batches(2, seed=2), progress=False)
    ctx.report.begin_step("qat", {})
    return Qat(Qat.Config.model_validate(cfg)).run(worker.make_model(), ctx)


def test_lsq_world_hooks_give_the_union_batch_gradient_scale():
    """Under N ranks each activation step sees 1/N of the global batch; the hook must turn the
    rank's LSQ gradient (scale 1/sqrt(numel*qmax)) into the global batch's (1/sqrt(N*numel*qmax))."""
    model = _qat_prepared().train()
    layer = model.features[3]
    step = layer.input_step
    assert step is model.features[0].output_step               # a shared grid: one parameter
    x = torch.relu(torch.randn(5, 5, 7, 9, generator=torch.Generator().manual_seed(4)))
    w, wz = model.head[1].weight, torch.zeros(3, dtype=torch.int32)

    def grads(world):
        hooks = lsq_world_scale_hooks(model, world)
        for p in (step, model.head[1].weight_step):
            p.grad = None
        loss = lsq_fake_quantize(x, step, layer.input_zero_point_, ACT_QMIN, ACT_QMAX).pow(2).sum()
        loss = loss + lsq_fake_quantize(w, model.head[1].weight_step, wz, -8, 7, axis=0).pow(2).sum()
        loss.backward()
        for h in hooks:
            h.remove()
        return len(hooks), step.grad.clone(), model.head[1].weight_step.grad.clone()

    n4, got, w4 = grads(4)
    assert n4 == 3   # features.0 input and output (= features.3 input), features.3 output (= head.1 input)
    ref_step = step.detach().clone().requires_grad_(True)
    g = lsq_grad_scale(4 * x.numel(), 1, ACT_QMAX)              # what the 4x larger global batch uses
    lsq_fake_quantize(x, ref_step, layer.input_zero_point_, ACT_QMIN, ACT_QMAX, grad_scale=g).pow(2).sum().backward()
    assert float(ref_step.grad.abs()) > 0
    assert torch.allclose(got, ref_step.grad, rtol=1e-6, atol=0)
    n1, got1, w1 = grads(1)                                     # single process: no hook, LSQ's own scale
    assert n1 == 0 and torch.allclose(got1, 2 * got, rtol=1e-6)
    assert torch.equal(w4, w1) and float(w1.abs().sum()) > 0   # weight step sizes are never rescaled


@pytest.mark.slow
def test_qat_finetune_under_torchrun_matches_single_process_reference(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "ddp_qat_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["figures"]["world_size"] == 2 and r0["figures"]["steps"] == 6

    # 1. Identical ranks: weights, biases, LSQ-learned scales and zero points of the final (folded)
    #    model; the LSQ step sizes and the attached BNs' parameters and running statistics as they
    #    were when training ended (before the fold); and the plain BatchNorm of a bare finetune.
    lsq = r0["lsq_bn"]
    for name in ("features.0", "features.3", "head.1"):
        assert f"{name}.weight_step" in lsq and f"{name}.input_step" in lsq
    for name in ("features.0", "features.3"):
        assert int(lsq[f"{name}.bn.num_batches_tracked"]) == 4   # BN statistics frozen after 4 steps
    for part in ("state", "lsq_bn", "plain_bn"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)

    # 2. Independent reference: one process, each batch pair (2i, 2i+1) concatenated. Attached BNs
    #    use all ranks' batch statistics and LSQ's activation gradient scale counts the global batch,
    #    so data-parallel training is training on the union; only float summation order differs.
    b = worker.make_batches()
    merged = [(torch.cat([b[i][0], b[i + 1][0]]), torch.cat([b[i][1], b[i + 1][1]])) for i in range(0, 8, 2)]
    ref, ref_lsq = worker.run(merged, worker.make_batches(2, seed=2))
    ref_state = ref.model.state_dict()
    assert ref_state.keys() == r0["state"].keys() and ref_lsq.keys() == lsq.keys()
    for got, want in ((r0["state"], ref_state), (lsq, ref_lsq)):
        for k, v in want.items():
            assert torch.allclose(got[k].double(), v.double(), rtol=1e-5, atol=1e-7), k
    ref_figs = next(s for s in ref.report["steps"] if s["name"] == "finetune")["figures"]
    for k in ("first_loss", "final_loss"):
        assert math.isclose(r0["figures"][k], ref_figs[k], rel_tol=1e-5), k
    # Training moved the step sizes and the BN statistics away from their calibrated/initial values.
    start = dict(_qat_prepared().named_parameters())
    assert not torch.allclose(lsq["features.0.input_step"], start["features.0.input_step"])
    assert not torch.allclose(lsq["features.3.weight_step"], start["features.3.weight_step"])
    assert not torch.allclose(lsq["features.3.bn.running_var"], worker.make_model().features[4].running_var)
    assert not torch.equal(r0["plain_bn"]["2.running_mean"], torch.zeros(5))

    # 3. The artifact rank 0 wrote reloads onto a fresh net, computes what the reference computes,
    #    and its ONNX model agrees in ONNX Runtime (int8 kernels) within one 8-bit output step.
    fig = r0["export"]
    assert fig["ort_int8_ops"] == {"QGemm": 1, "QLinearConv": 2} and fig["top1_agreement"] == 1.0
    assert fig["max_abs_diff"] <= fig["tolerance"]
    loaded = nsq.load(tmp_path / "artifact", worker.make_model())
    ort = OrtModule(str(tmp_path / "artifact" / "model.onnx"))
    ref.model.eval()
    for xb, _ in worker.make_batches(3, seed=5):
        with torch.no_grad():
            y, y_ref = loaded(xb), ref.model(xb)
        step8 = float(y.max() - y.min()) / 255
        assert float((y - y_ref).abs().max()) <= 1e-5
        assert float((ort(xb) - y).abs().max()) <= step8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "rank0.pt", "rank1.pt"]
