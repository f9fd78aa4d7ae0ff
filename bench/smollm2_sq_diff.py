"""SmoothQuant (alpha 0.5) + W8A8 on SmolLM2-135M: nnsqueeze's and llm-compressor's models, layer by layer.

Three commands (llm-compressor lives in its own venv, so each tool dumps its model in its own process):

- ``dump``: runs one tool's row of ``bench/smollm2.py`` (nnsqueeze: ``SmoothQuant a=0.5 ema range``;
  llm-compressor: ``SmoothQuant a=0.5``) on the same windows, in the order ``--calib-order`` gives, and
  writes for every decoder-block Linear its smoothed float weight, per-row weight scale and input
  activation scale / zero point (int8 convention: llm-compressor's codes -128..127, nnsqueeze's uint8
  zero point minus 128), every norm weight after smoothing, and the perplexity of the tool's own model;
- ``compare A.pt B.pt``: per projection (q, k, v, o, gate, up, down over the 30 blocks), B / A of the
  activation scales and weight scales, zero-point differences and the smoothed weights' largest
  relative difference, after the constant factors between the tools (llm-compressor's smoothing factor
  divides by ``sqrt(2 max|W|)``, nnsqueeze's by ``sqrt(max|W|)``: its smoothed inputs are ``sqrt 2`` times
  nnsqueeze's; its weight grid is ``absmax / 127.5``, nnsqueeze's ``absmax / 127``);
- ``swap A.pt``: one plain W8A8 simulator (``clamp(round(x / s) + z)``, per-row symmetric int8
  weights) evaluates a dump with each tool's conventions swapped in: the rounding order
  ``round(x / s + z)`` of compressed-tensors and the ``absmax / 127.5`` weight grid.

Same perplexity protocol as ``bench/smollm2.py`` (16 windows of 256 tokens of the stdlib comments). ::

    python bench/smollm2_sq_diff.py dump --tool nnsqueeze --out /tmp/nsq.pt
    /work/venvs/llmc/bin/python bench/smollm2_sq_diff.py dump --tool llmcompressor --out /tmp/llmc.pt
    python bench/smollm2_sq_diff.py compare /tmp/nsq.pt /tmp/llmc.pt
    python bench/smollm2_sq_diff.py swap /tmp/nsq.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2 as bench  # noqa: E402  (the same windows, model and methods)

from nnsqueeze.hf_io import load_model  # noqa: E402
from nnsqueeze.llm.perplexity import perplexity  # noqa: E402
from nnsqueeze.zoo import smollm2  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
ROWS = {"nnsqueeze": "SmoothQuant a=0.5 ema range", "llmcompressor": "SmoothQuant a=0.5"}
SMOOTHED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # inputs that come from a smoothed norm
EVAL_WINDOWS = 16


def setup(threads: int):
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, tok = load_model(smollm2.model_dir(), task="causal-lm")
    return model, tok, bench.eval_tokens(tok)[: EVAL_WINDOWS * bench.SEQ_LEN]


def ppl(model, val) -> float:
    return perplexity(model, val, seq_len=bench.SEQ_LEN, max_windows=EVAL_WINDOWS).ppl


def dump(a) -> None:
    model, tok, val = setup(a.threads)
    calib_t = bench.calibration(tok, a.calib)
    if a.calib_order != "stream":
        calib_t = calib_t[[int(i) for i in a.calib_order.split(",")]]
    methods = bench.nnsqueeze_methods if a.tool == "nnsqueeze" else bench.llmc_methods
    fn = next(f for _, name, f in methods(a.calib) if name == ROWS[a.tool])
    m, _ = fn(model, list(calib_t.split(8)))
    sd = m.state_dict()
    suffix = "_" if a.tool == "nnsqueeze" else ""     # nnsqueeze's buffers end in "_"
    shift = 128 if a.tool == "nnsqueeze" else 0       # its activation codes are uint8
    out = {"tool": a.tool, "calib_order": a.calib_order, "w": {}, "ws": {}, "a": {}, "n": {}}
    for b in range(len(m.model.layers)):
        for n in NORMS:
            out["n"][f"model.layers.{b}.{n}"] = sd[f"model.layers.{b}.{n}.weight"].clone()
        for p in LINEARS:
            k = f"model.layers.{b}.{p}"
            out["w"][k] = sd[f"{k}.weight"].clone()
            out["ws"][k] = sd[f"{k}.weight_scale{suffix}"].reshape(-1).float().clone()
            out["a"][k] = (sd[f"{k}.input_scale{suffix}"].reshape(()).float().clone(),
                           sd[f"{k}.input_zero_point{suffix}"].reshape(()).float() - shift)
    out["ppl"] = ppl(m, val)
    torch.save(out, a.out)
    print(f"{a.tool} ({ROWS[a.tool]}, calib order {a.calib_order}): perplexity {out['ppl']:.4f} -> {a.out}")


def _constants(a: dict, b: dict, proj: str) -> tuple[float, float]:
    """(input factor, weight-grid factor) that B's figures carry over A's by construction."""
    f_in = 2 ** 0.5 if proj.split(".")[-1] in SMOOTHED else 1.0
    grid = {"nnsqueeze": 127.0, "llmcompressor": 127.5}
    f_in = f_in if (a["tool"], b["tool"]) == ("nnsqueeze", "llmcompressor") else \
        1 / f_in if (a["tool"], b["tool"]) == ("llmcompressor", "nnsqueeze") else 1.0
    return f_in, grid[a["tool"]] / grid[b["tool"]] / f_in


def compare(a) -> None:
    A, B = torch.load(a.dumps[0]), torch.load(a.dumps[1])
    print(f"B = {B['tool']} (order {B['calib_order']}, ppl {B['ppl']:.4f}) over "
          f"A = {A['tool']} (order {A['calib_order']}, ppl {A['ppl']:.4f}); ratios divided by the constant factors")
    print("| proj | act scale B/A: median [min, max] | max abs zp diff | weight scale B/A: median [min, max] "
          "| smoothed W max rel diff |\n|---|---|---|---|---|")
    for p in LINEARS:
        keys = [k for k in A["w"] if k.endswith(p)]
        f_in, f_w = _constants(A, B, p)
        act = torch.stack([B["a"][k][0] / A["a"][k][0] / f_in for k in keys]).double()
        zp = max(float((B["a"][k][1] - A["a"][k][1]).abs()) for k in keys)
        ws = torch.cat([B["ws"][k] / A["ws"][k] / f_w for k in keys]).double()
        wd = max(float((B["w"][k].double() * f_in - A["w"][k].double()).abs().max() / A["w"][k].abs().max())
                 for k in keys)
        print(f"| {p.split('.')[-1]} | {act.median():.6f} [{act.min():.6f}, {act.max():.6f}] | {zp:.0f} | "
              f"{ws.median():.6f} [{ws.min():.6f}, {ws.max():.6f}] | {wd:.1e} |")
    f_in = _constants(A, B, "q_proj")[0]  # a norm's output (its weight) carries the factor its Linears' inputs do
    nd = max(float((B["n"][k].double() / f_in - A["n"][k].double()).abs().max() / A["n"][k].abs().max())
             for k in A["n"])
    print(f"norm weights after smoothing (B over the input factor vs A): max rel diff {nd:.1e}")


def _fq(x, s, z, add_then_round: bool):
    if add_then_round:   # compressed-tensors: round(clamp(x / s + z))
        return (torch.round(torch.clamp(x / s + z, -128, 127)) - z) * s
    return (torch.clamp(torch.round(x / s) + z, -128, 127) - z) * s   # nnsqueeze: clamp(round(x / s) + z)


def simulate(model, val, d: dict, add_then_round: bool = False, grid: float | None = None) -> float:
    """Perplexity of ``model`` carrying dump ``d`` (smoothed weights, norms, scales) under plain fake
    quantization; ``grid`` re-derives the weight scales as ``absmax / grid`` (None: the dump's)."""
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for k, w in d["n"].items():
                model.get_submodule(k).weight.copy_(w)
            for k, w in d["w"].items():
                lin = model.get_submodule(k)
                lin.weight.copy_(w)
                ws = d["ws"][k] if grid is None else (w.abs().amax(1) / grid).clamp(min=1e-12)
                wq = _fq(w, ws[:, None], 0.0, add_then_round)
                s, z = d["a"][k]
                lin.forward = lambda x, wq=wq, s=s, z=z, b=lin.bias: F.linear(_fq(x, s, z, add_then_round), wq, b)
        return ppl(model, val)
    finally:
        for k in d["w"]:
            model.get_submodule(k).__dict__.pop("forward", None)
        model.load_state_dict(orig)


def swap(a) -> None:
    model, _, val = setup(a.threads)
    d = torch.load(a.dump)
    print(f"{d['tool']} dump (order {d['calib_order']}), its own model: {d['ppl']:.4f}")
    for label, kw in (("simulated as dumped", {}), ("rounding round(x / s + z)", {"add_then_round": True}),
                      ("weights absmax / 127.5", {"grid": 127.5}), ("weights absmax / 127", {"grid": 127.0}),
                      ("round(x / s + z) and absmax / 127.5", {"add_then_round": True, "grid": 127.5})):
        print(f"{label}: {simulate(model, val, d, **kw):.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--tool", choices=list(ROWS), required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--calib", type=int, default=16)
    d.add_argument("--calib-order", default="stream")
    c = sub.add_parser("compare")
    c.add_argument("dumps", nargs=2)
    s = sub.add_parser("swap")
    s.add_argument("dump")
    for p in (d, s):
        p.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    {"dump": dump, "compare": compare, "swap": swap}[a.cmd](a)


if __name__ == "__main__":
    main()
