"""``nnsqueeze demo --llm``: GPTQ int4 on the embedded language model, measured, with targets checked.

The LLaMA-style model of :mod:`nnsqueeze.zoo.pylm` (trained once on the text that ships with
Python, then cached) is compressed with the ``w4-g128-gptq`` preset through :func:`nnsqueeze.compress`
(32 calibration windows from the *train* split), written as an artifact (packed int4 codes), reloaded
with :func:`nnsqueeze.load`, and compared with the fp32 model:

- perplexity, pinned protocol (:mod:`nnsqueeze.llm.perplexity`): token level, non-overlapping windows
  of ``pylm.EVAL_SEQ_LEN[size]`` tokens (256 for the default size) over the whole *validation* split,
  first token of each window unscored, tail dropped;
- weight bytes of the quantized Linears (fp32 vs packed codes + scales + zero points) and of the
  whole model (embeddings and ``lm_head`` stay fp32), and the artifact's bytes on disk;
- greedy generation throughput (``model.generate``, KV cache, median of 3 runs) and a sample; the packed
  model also through the C decode loop (:func:`nnsqueeze.llm.fastdecode.generate`, same tokens checked).

The demo's ONNX export is switched off (``export.onnx: null``): the preset's steps are used as
they are, and the numbers are torch's. ::

    from nnsqueeze.demo_llm import run_demo_llm
    ok = run_demo_llm("nnsqueeze-demo-llm")            # size="tiny": a seconds-long smoke run
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

PRESET = "w4-g128-gptq"
CALIB_SAMPLES = 32
PROMPT = "Return a new list containing"

# Targets (issue 6) for the default size; the tiny size is a smoke test and reports without checking.
MAX_PPL_INCREASE = 0.10      # packed int4 perplexity <= 1.10 x fp32
MIN_WEIGHT_RATIO = 3.0       # quantized Linears: >= 3x fewer weight bytes than fp32
MIN_SPEED_RATIO = 1.0        # packed generation tokens/s >= fp32


def _gen_speed(model, ids: torch.Tensor, new_tokens: int, runs: int = 3, c_loop: bool = False
               ) -> tuple[float, torch.Tensor]:
    """Median tokens/s of greedy generation of exactly ``new_tokens`` tokens, and the output ids:
    ``model.generate``, or with ``c_loop`` :func:`nnsqueeze.llm.fastdecode.generate` (the C decode loop)."""
    from .llm import fastdecode

    gen = (lambda i, **kw: fastdecode.generate(model, i, **kw)) if c_loop else model.generate
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    times = []
    with torch.inference_mode():
        gen(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)   # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            out = gen(ids, **kw)
            times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times), out


def _quantized_bytes(path: Path, names: list[str]) -> int:
    """Bytes the artifact's ``model.safetensors`` stores for these layers (codes, scales, zero points)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for n in names:
            for suffix in ("weight", "weight_scale_", "weight_zero_point_", "bias"):
                k = f"{n}.{suffix}"
                if k in keys:
                    t = f.get_slice(k)
                    numel = 1
                    for d in t.get_shape():
                        numel *= d
                    total += numel * {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}[t.get_dtype()]
    return total


def check_targets(m: dict[str, Any]) -> list[tuple[str, str, bool]]:
    inc = m["ppl_int4"] / m["ppl_fp32"] - 1
    ratio = m["quantized_fp32_bytes"] / m["quantized_packed_bytes"]
    speed = m["gen_tokens_per_s_int4"] / m["gen_tokens_per_s_fp32"]
    return [
        (f"int4 perplexity within {100 * MAX_PPL_INCREASE:.0f}% of fp32", f"{100 * inc:+.2f}%",
         inc <= MAX_PPL_INCREASE),
        (f"quantized weights >= {MIN_WEIGHT_RATIO:.0f}x smaller", f"{ratio:.2f}x", ratio >= MIN_WEIGHT_RATIO),
        ("packed generation at least as fast as fp32", f"{speed:.2f}x", speed >= MIN_SPEED_RATIO),
        ("artifact reloads to the compressed model's logits (max |diff| <= 1e-4)", f"{m['reload_max_abs_diff']:.1e}",
         m["reload_max_abs_diff"] <= 1e-4),
    ]


def run_demo_llm(out: str | Path = "nnsqueeze-demo-llm", size: str = "default", retrain: bool = False,
                 console: Console | None = None, progress: bool = True, new_tokens: int | None = None,
                 overwrite: bool = False) -> bool:
    """Run the demo; returns whether every target was met (always True for ``size="tiny"`` once it runs).
    A previous demo artifact in ``out`` holding nothing else is replaced (else ``overwrite`` is needed)."""
    import nnsqueeze as nsq
    from .artifact import check_out, only_ours
    from .llm.perplexity import perplexity
    from .quant.weight_only import WeightOnlyLinear
    from .recipe import load_recipe
    from .safeio import write_file
    from .zoo import pylm

    console = console or Console()
    overwrite = overwrite or only_ours(out)
    check_out(out, overwrite, where="--out")  # before training and compressing
    t0 = time.perf_counter()
    tok = pylm.load_tokenizer(size)
    model = pylm.pretrained("llama", size, force=retrain)
    train_info = pylm.info("llama", size) or {}
    seq_len = pylm.EVAL_SEQ_LEN[size]
    calib = pylm.calibration(CALIB_SAMPLES, seq_len, size)
    recipe = load_recipe(PRESET).to_dict()
    recipe["export"] = {"onnx": None}                               # torch numbers only (see docstring)
    recipe["evaluate"].update(warmup=1, runs=3, per_step=False)

    t_c = time.perf_counter()
    result = nsq.compress(model, recipe, calib_data=calib, metric=None, progress=progress)
    compress_s = time.perf_counter() - t_c
    path = result.save(out, overwrite=overwrite)
    loaded = nsq.load(path, model=pylm.build_model("llama", size, vocab_size=len(tok)))
    names = [n for n, mod in loaded.named_modules() if isinstance(mod, WeightOnlyLinear)]
    with torch.inference_mode():
        probe = calib[0][:2]
        diff = float((loaded(probe).logits - result.model(probe).logits).abs().max())

    val = pylm.token_stream("validation", size, tokenizer=tok)
    p32 = perplexity(model, val, seq_len=seq_len)
    p4 = perplexity(loaded, val, seq_len=seq_len)
    ids = torch.tensor([tok.encode(PROMPT)])
    n_new = new_tokens or (48 if size == "default" else 12)
    s32, g32 = _gen_speed(model, ids, n_new)
    s4, g4 = _gen_speed(loaded, ids, n_new)
    s4c, g4c = _gen_speed(loaded, ids, n_new, c_loop=True)
    # fp32 bytes of the same layers: in x out x 4 (the packed module's own ``weight`` may hold codes)
    q32 = sum(loaded.get_submodule(n).in_features * loaded.get_submodule(n).out_features * 4 for n in names)
    m = {
        "size": size, "preset": PRESET, "params": sum(p.numel() for p in model.parameters()),
        "quantized_layers": len(names), "ppl_fp32": p32.ppl, "ppl_int4": p4.ppl, "eval": p32.as_dict(),
        "quantized_fp32_bytes": q32, "quantized_packed_bytes": _quantized_bytes(path, names),
        "model_fp32_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "model_safetensors_bytes": (path / "model.safetensors").stat().st_size,
        "artifact_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "gen_tokens_per_s_fp32": s32, "gen_tokens_per_s_int4": s4, "new_tokens": n_new,
        "gen_tokens_per_s_int4_c_loop": s4c, "c_loop_tokens_equal": g4c.tolist() == g4.tolist(),
        "threads": torch.get_num_threads(), "reload_max_abs_diff": diff, "compress_seconds": compress_s,
        "sample_fp32": tok.decode(g32[0]), "sample_int4": tok.decode(g4[0]),
        "train": {k: train_info.get(k) for k in ("seconds", "steps_per_s", "threads", "validation_ppl")},
    }
    m["seconds"] = time.perf_counter() - t0
    write_file(path / "demo-llm.json", (json.dumps(m, indent=2) + "\n").encode(), "--out")

    t = Table(title=f"nnsqueeze demo --llm: {PRESET} on the embedded LLaMA-style LM ({size}, {m['params'] / 1e6:.1f}M "
                    f"params, {len(names)} Linears packed)")
    for col in ("", "fp32", "packed int4", "ratio"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row(f"perplexity (validation, {p32.windows} x {seq_len}-token windows)", f"{p32.ppl:.3f}", f"{p4.ppl:.3f}",
              f"{p4.ppl / p32.ppl:.4f}")
    t.add_row("quantized Linears' weight bytes", f"{q32:,}", f"{m['quantized_packed_bytes']:,}",
              f"{q32 / m['quantized_packed_bytes']:.2f}x smaller")
    t.add_row("whole model weight bytes (embeddings, lm_head fp32)", f"{m['model_fp32_bytes']:,}",
              f"{m['model_safetensors_bytes']:,}",
              f"{m['model_fp32_bytes'] / m['model_safetensors_bytes']:.2f}x smaller")
    t.add_row("artifact bytes on disk (all files)", "", f"{m['artifact_bytes']:,}", "")
    t.add_row(f"generation tokens/s (greedy, {n_new} tokens, {m['threads']} threads)", f"{s32:.1f}", f"{s4:.1f}",
              f"{s4 / s32:.2f}x")
    same = "same tokens" if m["c_loop_tokens_equal"] else "TOKENS DIFFER"
    t.add_row(f"  the same, C decode loop (llm/fastdecode.py, {same})", "", f"{s4c:.1f}", f"{s4c / s32:.2f}x")
    console.print(t)
    console.print(f"[bold]prompt[/]: {PROMPT!r}")
    console.print(f"[bold]fp32[/]:        {m['sample_fp32']!r}")
    console.print(f"[bold]packed int4[/]: {m['sample_int4']!r}")
    rows = check_targets(m)
    tt = Table(title="demo --llm targets" + (" (tiny: smoke run, not checked)" if size == "tiny" else ""))
    for col in ("target", "measured", "met"):
        tt.add_column(col)
    for name, val, ok in rows:
        tt.add_row(name, val, "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(tt)
    console.print(f"artifact written to [bold]{path}[/] (model.safetensors, nnsqueeze.json manifest, report, "
                  "demo-llm.json); "
                  f"compression {compress_s:.1f} s, demo {m['seconds']:.0f} s")
    return size == "tiny" or all(ok for _, _, ok in rows)
