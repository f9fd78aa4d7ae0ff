"""Benchmark: post-training LLM compression on the embedded LMs (perplexity and wall time).

On the LLaMA-style and the GPT-2-architecture models of :mod:`nnsqueeze.zoo.pylm` (same tokenizer,
corpus and training recipe), measures validation perplexity with the pinned protocol
(:mod:`nnsqueeze.llm.perplexity`: token level, non-overlapping 256-token windows from the start of
the validation split, first token of each window unscored, tail dropped; ``--max-windows`` caps the
number of windows, the table says how many) for:

- fp32;
- W8A8 (``quantize``: int8 per-channel symmetric weights, int8 per-tensor asymmetric activations at
  every block Linear's input, minmax) naive vs after ``smoothquant`` (alpha 0.5);
- W4 g128 symmetric weight-only: ``rtn``, ``gptq`` (act order), ``awq``, and AWQ+GPTQ (AWQ's scale
  search, then GPTQ on ``W diag(s)`` with the Hessian of ``X diag(1/s)``: ``llm/awq.py`` +
  ``llm/gptq.py`` through ``llm/sequential.run_sequential``; simulated weights, same as packed);
- 50% unstructured and 2:4 sparsity: magnitude (per layer; 2:4 per group of 4 inputs), ``wanda``,
  ``sparsegpt``.

Only Linears inside the decoder blocks are compressed (``lm_head`` and embeddings stay fp32, as
usual). Calibration: ``--calib`` random 256-token windows of the *train* split (seed 0). GPT-2's
``Conv1D`` layers are first replaced by the equivalent ``nn.Linear`` (same outputs) so that the
``quantize`` step, which handles Linear/Conv only, applies. Wall time = the step(s)' seconds.

    python bench/llm_ppl.py [--archs llama gpt2] [--calib 64] [--max-windows N] [--threads 1]
                            [--only RTN GPTQ ...] [--llmcompressor]

``--llmcompressor`` adds llm-compressor's GPTQ on the same model, calibration windows and evaluation
(run with a Python where ``llmcompressor`` imports, e.g. a venv with ``--system-site-packages``).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.env import cpu_model
from nnsqueeze.llm.awq import AWQAccumulator, awq_search
from nnsqueeze.llm.gptq import gptq_quantize
from nnsqueeze.llm.perplexity import perplexity
from nnsqueeze.llm.sequential import block_linears, get_weight, run_sequential, set_weight
from nnsqueeze.llm.wanda import wanda_prune
from nnsqueeze.targets import set_module
from nnsqueeze.zoo import pylm

W8A8 = {"weights": {"bits": 8, "granularity": "per-channel", "symmetric": True, "reduce_range": False},
        "activations": {"bits": 8, "granularity": "per-tensor", "symmetric": False},
        "ignore": ["lm_head"]}
W4 = {"bits": 4, "group_size": 128, "symmetric": True}


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """Replace transformers' ``Conv1D`` (weight (in, out)) by the equivalent ``nn.Linear``, in place."""
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "Conv1D":
            k, n = mod.weight.shape
            lin = nn.Linear(k, n, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_module(model, name, lin)
    return model


def via_recipe(steps: list[dict]):
    def run(model, calib):
        recipe = {"version": 1, "steps": steps, "export": {"onnx": None},
                  "evaluate": {"warmup": 0, "runs": 1, "per_step": False}}
        res = nsq.compress(model, recipe, calib_data=calib, metric=None, progress=False)
        return res.model, sum(s["seconds"] for s in res.report["steps"])
    return run


def with_samples(steps: list[dict], n: int) -> list[dict]:
    out = []
    for s in steps:
        (name, cfg), = s.items()
        cfg = dict(cfg)
        if name == "quantize":
            cfg["calibration"] = {"method": "minmax", "samples": n}
        else:
            cfg["samples"] = n
        out.append({name: cfg})
    return out


def magnitude(n: int, m: int):
    """Magnitude pruning of the block Linears: 50% per layer (n = m = 0) or n of every m inputs per row."""
    def run(model, calib):
        import copy
        model = copy.deepcopy(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            for name in block_linears(model):
                mod = model.get_submodule(name)
                w = get_weight(mod)
                if n:
                    # |W| * 1: Wanda's ranking with unit input norms is magnitude within each group of m.
                    set_weight(mod, wanda_prune(w, torch.ones(w.shape[1]), 0.5, n, m).weight)
                else:
                    k = round(0.5 * w.numel())
                    thr = w.abs().flatten().kthvalue(k).values
                    keep = w.abs() > thr
                    # ties at the threshold: keep exactly numel - k weights
                    extra = int(w.numel() - k - keep.sum())
                    if extra > 0:
                        tie = (w.abs() == thr).flatten().nonzero().flatten()[:extra]
                        keep.view(-1)[tie] = True
                    set_weight(mod, w * keep)
        return model, time.perf_counter() - t0
    return run


def awq_gptq(wq: dict):
    """AWQ's scales, then GPTQ on the scaled weight (Hessian of the scaled inputs), simulated."""
    def run(model, calib):
        import copy
        model = copy.deepcopy(model)
        t0 = time.perf_counter()

        def apply(name, mod, acc):
            w = get_weight(mod)
            s = awq_search(w, acc.abs_mean, acc.hessian, **wq).scales.double()       # (in,)
            h = acc.hessian.double() / s[:, None] / s[None, :]                          # D^-1 H D^-1
            r = gptq_quantize((w.double() * s).float(), h, act_order=True, **wq)
            set_weight(mod, (r.weight.double() / s).float())

        run_sequential(model, calib, block_linears(model), lambda n, m: AWQAccumulator(get_weight(m).shape[1]), apply)
        return model, time.perf_counter() - t0
    return run


def llmcompressor_gptq(model, calib):
    """llm-compressor's GPTQ (``W4A16``: int4 symmetric, group 128, static act order) on the same
    calibration windows; its fake-quantized model is evaluated as it is."""
    import copy

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = copy.deepcopy(model)
    rows = torch.cat(calib)
    ds = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            max_seq_length=rows.shape[1], num_calibration_samples=rows.shape[0])
    return model.eval(), time.perf_counter() - t0


def methods(n: int, llmcompressor: bool = False, bits: int = 4) -> list[tuple[str, str, object]]:
    q = lambda steps: via_recipe(with_samples(steps, n))  # noqa: E731
    wq, wl = {**W4, "bits": bits}, f"W{bits} g128"
    return [
        ("fp32", "fp32", None),
        ("W8A8", "naive (minmax)", q([{"quantize": W8A8}])),
        ("W8A8", "SmoothQuant a=0.5", q([{"smoothquant": {"alpha": 0.5}}, {"quantize": W8A8}])),
        (wl, "RTN", via_recipe([{"rtn": {**wq, "pack": False}}])),
        (wl, "GPTQ (act order)", q([{"gptq": {**wq, "act_order": True, "pack": False}}])),
        (wl, "AWQ", q([{"awq": wq}])),
        (wl, "AWQ+GPTQ", awq_gptq(wq)),
        *([(wl, "llm-compressor GPTQ", llmcompressor_gptq)] if llmcompressor and bits == 4 else []),
        ("50% unstructured", "magnitude", magnitude(0, 0)),
        ("50% unstructured", "Wanda", q([{"wanda": {"sparsity": 0.5, "report_error": False}}])),
        ("50% unstructured", "SparseGPT", q([{"sparsegpt": {"sparsity": 0.5}}])),
        ("2:4", "magnitude", magnitude(2, 4)),
        ("2:4", "Wanda", q([{"wanda": {"pattern": "2:4", "report_error": False}}])),
        ("2:4", "SparseGPT", q([{"sparsegpt": {"pattern": "2:4"}}])),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(pylm.ARCHS), choices=pylm.ARCHS)
    ap.add_argument("--size", default="default", choices=pylm.SIZES)
    ap.add_argument("--calib", type=int, default=64, help="calibration windows from the train split")
    ap.add_argument("--max-windows", type=int, default=None, help="cap on the validation windows (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="method names to run (default: all)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--bits", type=int, default=4, help="weight-only bits of the RTN/GPTQ/AWQ rows (4; 3 as a "
                    "harder diagnostic)")
    ap.add_argument("--llmcompressor", action="store_true", help="add llm-compressor's GPTQ (must be importable)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seq_len = pylm.EVAL_SEQ_LEN[a.size]
    tok = pylm.load_tokenizer(a.size)
    val = pylm.token_stream("validation", a.size, tokenizer=tok)
    calib = [b for b in pylm.calibration(a.calib, seq_len, a.size)]
    print(f"# llm_ppl  {date.today()}  CPU: {cpu_model()}  threads: {a.threads}  calib: {a.calib} x {seq_len} tokens "
          f"(train split)  eval: {seq_len}-token windows of the validation split "
          f"({val.numel()} tokens, max_windows={a.max_windows})", flush=True)
    rows = []
    for arch in a.archs:
        base = pylm.pretrained(arch, a.size)
        if arch == "gpt2":
            base = conv1d_as_linear(base)
        info = pylm.info(arch, a.size) or {}
        print(f"\n## {arch}: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params, "
              f"trained {info.get('seconds')} s "
              f"at {info.get('threads')} thread(s)\n", flush=True)
        print("| scheme | method | ppl | vs fp32 | wall s |\n|---|---|---|---|---|", flush=True)
        fp32 = None
        for scheme, name, fn in methods(a.calib, a.llmcompressor, a.bits):
            if a.only and name not in a.only and name.split(" ")[0] not in a.only and name != "fp32":
                continue
            if fn is None:
                model, secs = base, 0.0
            else:
                model, secs = fn(base, calib)
            r = perplexity(model, val, seq_len=seq_len, max_windows=a.max_windows)
            fp32 = r.ppl if fn is None else fp32
            rel = "" if fp32 is None else f"{100 * (r.ppl / fp32 - 1):+.2f}%"
            rows.append({"arch": arch, "scheme": scheme, "method": name, "ppl": r.ppl, "seconds": secs,
                         "windows": r.windows, "scored_tokens": r.scored_tokens})
            print(f"| {scheme} | {name} | {r.ppl:.3f} | {rel} | {secs:.1f} |", flush=True)
            del model
        by = {(x["scheme"], x["method"]): x["ppl"] for x in rows if x["arch"] == arch}
        wl = f"W{a.bits} g128"
        rtn, g = by.get((wl, "RTN")), [by.get((wl, k)) for k in ("GPTQ (act order)", "AWQ+GPTQ")]
        if rtn and fp32 and rtn - fp32 < 1e-3 * fp32:
            print(f"{arch}: {wl} RTN is within 0.1% of fp32 ({rtn:.3f} vs {fp32:.3f}): the share of RTN's gap "
                  "closed is not meaningful here")
        elif rtn and fp32:
            for label, v in zip(("GPTQ", "AWQ+GPTQ"), g):
                if v is not None:
                    print(f"{arch}: {wl} {label} closes {100 * (rtn - v) / (rtn - fp32):.1f}% of RTN's gap to fp32")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": str(date.today()), "cpu": cpu_model(), "threads": a.threads,
                                            "calib": a.calib, "max_windows": a.max_windows, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
