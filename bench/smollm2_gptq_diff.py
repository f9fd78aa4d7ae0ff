"""GPTQ on SmolLM2-135M (act order, W4 g64, llm-compressor's grid): both tools' solves, layer by layer.

Why: on 7 of 8 calibration sets nnsqueeze's ``GPTQ (act order) full range`` row came out above
llm-compressor's ``GPTQ (act order)`` (BENCHMARKS.md). This script tells whether the two tools run a different
algorithm or the same one with different float rounding. Two commands (llm-compressor lives in its own venv):

- ``dump``: runs one tool's row of ``bench/smollm2.py`` on the same windows and records, for every Linear of the
  first ``--blocks`` decoder blocks, the weight, the Hessian and the quantized weight the tool's GPTQ solve gets
  and returns (nnsqueeze: ``steps.gptq.gptq_quantize``; llm-compressor: ``gptq.base.quantize_weight``), then
  stops the run;
- ``compare NSQ.pt LLMC.pt``: layers matched by their (unquantized) weight. Per layer:

  - ``H rel. diff``: ``||H_llmc - c H_nsq|| / ||H_llmc||``, ``c`` the least-squares scale between them (the
    tools normalise by tokens and by sequences);
  - ``codes differ``: the share of quantized weights that differ between the tools' own results;
  - ``nsq solve on llmc's H``: nnsqueeze's ``gptq_quantize`` (``full_range``, act order) on llm-compressor's very
    Hessian and weight: the share of codes that differ from llm-compressor's result and the ratio of the two
    quadratic errors ``tr((W - Q) H (W - Q)^T)``, both on llm-compressor's H;
  - ``inverse factor error``: relative error of each tool's float32 upper factor of ``(H + lambda I)^-1`` (act
    order applied), against the same factor in float64.

::

    python bench/smollm2_gptq_diff.py dump --tool nnsqueeze --out /tmp/nsq.pt
    /work/venvs/llmc/bin/python bench/smollm2_gptq_diff.py dump --tool llmcompressor --out /tmp/llmc.pt
    python bench/smollm2_gptq_diff.py compare /tmp/nsq.pt /tmp/llmc.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2 as bench  # noqa: E402  (the same windows, model and methods)

from nnsqueeze.hf_io import load_model  # noqa: E402
from nnsqueeze.zoo import smollm2  # noqa: E402

ROWS = {"nnsqueeze": "GPTQ (act order) full range", "llmcompressor": "GPTQ (act order)"}
LAYERS = 7  # Linears per LLaMA block


class _Stop(Exception):
    pass


def dump(a) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, tok = load_model(Path(a.model_dir) if a.model_dir else smollm2.model_dir(), task="causal-lm")
    calib = list(bench.calibration(tok, a.calib, seed=a.calib_seed, eos=model.config.eos_token_id).split(8))
    methods = bench.nnsqueeze_methods if a.tool == "nnsqueeze" else bench.llmc_methods
    run = next(fn for scheme, name, fn in methods(a.calib) if scheme == "W4 g64" and name == ROWS[a.tool])
    saved: list[dict] = []

    def keep(w, h, q, name=None):
        saved.append({"W": w.detach().float().clone(), "H": h.detach().double().clone(),
                      "Q": q.detach().float().clone(), "name": name})
        if len(saved) >= a.blocks * LAYERS:
            raise _Stop

    if a.tool == "nnsqueeze":
        import nnsqueeze.steps.gptq as step
        orig = step.gptq_quantize

        def patched(w, h, *args, **kw):
            r = orig(w, h, *args, **kw)
            keep(w, h, r.weight, kw.get("where", "").split(": ")[-1])
            return r
        step.gptq_quantize = patched
    else:
        import llmcompressor.modifiers.gptq.base as base
        orig = base.quantize_weight

        def patched(weights, hessians, *args, **kw):
            w, h = weights.clone(), hessians.clone()   # quantize_weight works in place on its inputs
            out = orig(weights, hessians, *args, **kw)
            for i in range(w.shape[0]):
                keep(w[i], h[i], out[0][i])
            return out
        base.quantize_weight = patched
    try:
        run(model, calib)
    except _Stop:
        pass
    torch.save({"tool": a.tool, "calib_sha": bench.sha(torch.cat(calib)), "layers": saved}, a.out)
    print(f"{a.tool}: {len(saved)} layers -> {a.out}")


def _quad(w, q, h) -> float:
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, h, d))


def _factor_errors(h: torch.Tensor) -> tuple[float, float]:
    from nnsqueeze.llm.gptq import inverse_cholesky
    perm = torch.argsort(torch.diagonal(h), descending=True)
    h = h[perm][:, perm]
    ref = inverse_cholesky(h, 0.01, 10.0, None, "ref")[0]
    ours = inverse_cholesky(h.float(), 0.01, 10.0, None, "nsq")[0].double()
    damped = h.float().clone()
    damped.diagonal().add_(0.01 * float(damped.diagonal().mean()))
    theirs = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True).double()
    return float((ours - ref).norm() / ref.norm()), float((theirs - ref).norm() / ref.norm())


def compare(a) -> None:
    from nnsqueeze.llm.gptq import gptq_quantize
    nsq, llmc = (torch.load(p, weights_only=False) for p in a.dumps)
    if nsq["calib_sha"] != llmc["calib_sha"]:
        raise SystemExit(f"different calibration windows: {nsq['calib_sha']} vs {llmc['calib_sha']}")
    print("| layer | H rel. diff | codes differ | nsq solve on llmc's H: codes differ | quad error ratio (nsq / llmc) "
          "| inverse factor error nsq / llmc |\n|---|---|---|---|---|---|")
    for n in nsq["layers"]:
        m = next((x for x in llmc["layers"] if x["W"].shape == n["W"].shape and torch.equal(x["W"], n["W"])), None)
        if m is None:
            print(f"| {n['name']} | no llm-compressor layer with this weight | | | | |")
            continue
        c = float((m["H"] * n["H"]).sum() / (n["H"] * n["H"]).sum())
        rel = float((m["H"] - c * n["H"]).norm() / m["H"].norm())
        own = float((n["Q"] != m["Q"]).float().mean())
        r = gptq_quantize(m["W"], m["H"], bits=4, group_size=64, symmetric=True, act_order=True, full_range=True)
        cross = float((r.weight != m["Q"]).float().mean())
        ratio = _quad(m["W"], r.weight, m["H"]) / _quad(m["W"], m["Q"], m["H"])
        fe = _factor_errors(m["H"])
        print(f"| {n['name']} | {rel:.1e} | {own:.2%} | {cross:.2%} | {ratio:.5f} | {fe[0]:.1e} / {fe[1]:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--tool", choices=list(ROWS), required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--model-dir", default=None, help="the converted SmolLM2 directory (the same for both tools)")
    d.add_argument("--calib", type=int, default=16)
    d.add_argument("--calib-seed", type=int, default=0)
    d.add_argument("--blocks", type=int, default=2)
    d.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("compare")
    c.add_argument("dumps", nargs=2, help="nnsqueeze's dump, then llm-compressor's")
    a = ap.parse_args()
    dump(a) if a.cmd == "dump" else compare(a)


if __name__ == "__main__":
    main()
