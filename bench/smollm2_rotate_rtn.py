"""Why ``rotate`` + ``rtn`` is worse than ``rtn`` on SmolLM2-135M (issue 11 item 4): measurements.

1. The residual stream's peak channels (``max |h|`` over the calibration windows, per channel) and
   the RMSNorm weights on them.
2. Each decoder Linear's relative output error under RTN (``||X (Q(W) - W)^T|| / ||X W^T||`` on its
   real inputs, float64), for the first token of each window (where the massive activation sits)
   and for the others: on the original model and after ``rotate`` (Hadamard, online Hadamard on
   ``down_proj``, as ``bench/smollm2.py``'s rotate rows).
3. Perplexity (the protocol of ``bench/smollm2.py``) of RTN on the original model, on the model with
   only the norm weights folded into q/k/v and gate/up (rotate's first stage, no rotation), and
   after ``rotate``.

    python bench/smollm2_rotate_rtn.py --bits 4 3 --calib 16 --eval-windows 16 --threads 1

Perplexities and errors do not depend on the machine's load; no timing is reported.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import SEQ_LEN, calibration, eval_tokens  # noqa: E402  (the same tokens)

from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.hf_io import load_model  # noqa: E402
from nnsqueeze.llm.perplexity import perplexity  # noqa: E402
from nnsqueeze.ops.rtn import rtn_quantize  # noqa: E402
from nnsqueeze.steps.rotate import MLP_READERS, READERS, Rotate, RotateConfig  # noqa: E402
from nnsqueeze.zoo import smollm2  # noqa: E402


def block_linears(m: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, x) for n, x in m.named_modules() if type(x) is nn.Linear and ".layers." in n]


@torch.no_grad()
def rtn(m: nn.Module, bits: int, group: int) -> nn.Module:
    for _, lin in block_linears(m):
        lin.weight.copy_(rtn_quantize(lin.weight, bits, group, True).weight)
    return m


@torch.no_grad()
def layer_errors(m: nn.Module, ids: torch.Tensor, bits: int, group: int) -> dict[str, tuple[float, float]]:
    """name -> (relative output error on token 0, on the other tokens)."""
    out, hooks = {}, []
    for n, lin in block_linears(m):
        w = lin.weight.detach().double()
        dw = rtn_quantize(lin.weight, bits, group, True).weight.double() - w

        def hook(mod, args, y, n=n, w=w, dw=dw):  # args: after any input-rotation pre-hook
            x = args[0].detach().double()
            ref, err = x @ w.T, x @ dw.T
            out[n] = (float(err[:, 0].norm() / ref[:, 0].norm()), float(err[:, 1:].norm() / ref[:, 1:].norm()))
        hooks.append(lin.register_forward_hook(hook))
    m(ids)
    for h in hooks:
        h.remove()
    return out


@torch.no_grad()
def fold_norms(m: nn.Module) -> nn.Module:
    for blk in m.model.layers:
        for norm_name, readers in (("input_layernorm", READERS), ("post_attention_layernorm", MLP_READERS)):
            norm = blk.get_submodule(norm_name)
            for r in readers:
                blk.get_submodule(r).weight.mul_(norm.weight.unsqueeze(0))
            norm.weight.fill_(1.0)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--error-windows", type=int, default=2, help="calibration windows for the layer errors")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-ppl", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, tok = load_model(smollm2.model_dir(), task="causal-lm")
    ids = calibration(tok, a.calib)[: a.error_windows]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states[1:-1]
    peak = torch.stack([h.abs().amax((0, 1)) for h in hs]).amax(0)
    med = statistics.median(float(h.abs().median()) for h in hs)
    top = peak.argsort(descending=True)[:4].tolist()
    print(f"residual stream: median |h| per block (median) {med:.2f}; peak channels "
          + ", ".join(f"{c}: {float(peak[c]):.0f}" for c in top))
    for c in top[:2]:
        for nn_ in ("input_layernorm", "post_attention_layernorm"):
            w = torch.stack([b.get_submodule(nn_).weight.detach()[c].abs() for b in model.model.layers])
            print(f"  channel {c} {nn_} |weight| min {float(w.min()):.2g} median {float(w.median()):.2g}")
    rotated = Rotate(RotateConfig(rotation="hadamard", seed=0, online_hadamard=True)).run(
        copy.deepcopy(model), Context())
    for bits in a.bits:
        e0, e1 = layer_errors(model, ids, bits, a.group), layer_errors(rotated, ids, bits, a.group)
        print(f"\nW{bits} g{a.group} RTN, relative output error, median over the 30 blocks "
              "(token 0 | other tokens): original -> rotated")
        for kind in READERS + MLP_READERS + ("self_attn.o_proj", "mlp.down_proj"):
            names = [n for n in e0 if n.endswith(kind)]
            f = lambda e, i, names=names: statistics.median(e[n][i] for n in names)  # noqa: E731
            worst = max(names, key=lambda n: e1[n][0] / e0[n][0])
            print(f"  {kind:18s} {f(e0, 0):.3f} -> {f(e1, 0):.3f} | {f(e0, 1):.3f} -> {f(e1, 1):.3f}   "
                  f"largest token-0 growth {e1[worst][0] / e0[worst][0]:.1f}x ({worst.split('.')[2]})")
    if a.skip_ppl:
        return
    val = eval_tokens(tok)[: a.eval_windows * SEQ_LEN]
    ppl = lambda m: perplexity(m, val, seq_len=SEQ_LEN, max_windows=a.eval_windows).ppl  # noqa: E731
    folded = fold_norms(copy.deepcopy(model))
    print(f"\nperplexity ({a.eval_windows} windows): fp32 {ppl(model):.2f}, norms folded {ppl(folded):.2f}, "
          f"rotated {ppl(rotated):.2f}", flush=True)
    for bits in a.bits:
        r = {name: ppl(rtn(copy.deepcopy(m), bits, a.group))
             for name, m in (("RTN", model), ("fold+RTN", folded), ("rotate+RTN", rotated))}
        print(f"W{bits} g{a.group}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
