"""Generation speed and weight memory: fp32 vs packed int4 / int8 (``rtn``/``gptq`` with ``pack: true``).

Model: the embedded LLaMA-style LM of :mod:`nnsqueeze.zoo.pylm` (hidden 384, 6 blocks, 4096 vocab,
untied lm_head, ~12.6M parameters). Its trained weights are used when they are already cached
(``pylm.pretrained("llama")``), otherwise the same architecture with random weights (speed and memory
do not depend on the values; the table says which). Quantization is ``rtn`` (speed does not depend on
how the codes were chosen), group size 128, symmetric.

Protocol: greedy ``model.generate`` at batch 1, a fixed 16-token prompt, exactly ``--new`` new tokens
(``min_new_tokens`` = ``max_new_tokens``, KV cache on), ``--runs`` timed runs after one warm-up run,
median tokens/s (new tokens / wall time, prefill included). Weight memory: bytes of every parameter
and buffer of the model (packed codes, scales, zero points, float embeddings, norms, lm_head).
Backends of the packed layers: ``c`` (nnsqueeze's kernel, default), ``aten`` (torch's
``_weight_int4pack_mm_for_cpu``), ``dequant`` (dequantize per call: the fallback)::

    python bench/llm_generate.py --memory          # threads 1 and 2, all rows, then the memory tables
    python bench/llm_generate.py --threads 1 --runs 3 --new 32
    python bench/llm_generate.py --memory-only

Memory tables (``--memory``; each row in its own process): anonymous resident memory (``RssAnon``:
heap and tensors, not the page cache behind memory maps) sampled every millisecond by a thread
(children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed tensors leave RSS at once),
while generating, and while ``gptq`` compresses the model that was loaded memory-mapped from a
safetensors file, with and without a ``max_memory`` budget below the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from nnsqueeze.context import Context
from nnsqueeze.registry import STEPS


def build():
    from nnsqueeze.zoo import pylm

    path = pylm.model_dir("llama")
    if (path / "pylm.json").is_file() and (path / "model.safetensors").is_file():
        return pylm.pretrained("llama"), "pylm llama (trained, cached)"
    return pylm.build_model("llama", "default", seed=0).eval(), "pylm llama architecture, random weights"


def quantize(model, steps):
    ctx = Context(progress=False)
    for i, (name, cfg) in enumerate(steps):
        ctx.report.begin_step(name, cfg)
        cls = STEPS.get(name)
        model = cls(cls.Config(**cfg), i).run(model, ctx)
    return model


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def tokens_per_s(model, prompt, new: int, runs: int) -> tuple[float, torch.Tensor]:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, **kw)  # warm-up (and the kernel build on first use)
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        out = model.generate(prompt, **kw)
        rates.append(new / (time.perf_counter() - t))
    return statistics.median(rates), out


def rss_anon_mib() -> float:
    """Anonymous resident memory of this process (heap, torch tensors; not file-backed pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """Peak of :func:`rss_anon_mib` sampled every millisecond by a thread, between start and stop."""

    def __enter__(self):
        self.peak, self._run = rss_anon_mib(), True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, rss_anon_mib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._run = False
        self._t.join()
        self.peak = max(self.peak, rss_anon_mib())


def malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise), so RssAnon shows live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def big_model(size: str):
    """``default``: the pylm LLaMA (12.6M parameters); ``large``: the same family at ~99M parameters."""
    from nnsqueeze.zoo import pylm

    if size == "default":
        return pylm.build_model("llama", "default", seed=0).eval()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def child_compress(weights: str, size: str, step: str, budget: str | None) -> dict:
    """``step`` on the model loaded memory-mapped from ``weights``; peak anonymous memory during the step."""
    from nnsqueeze.llm.offload import mmap_safetensors, tensor_bytes

    torch.set_num_threads(1)
    model = big_model(size)
    model_mib = tensor_bytes(model) / 2**20
    model.load_state_dict(mmap_safetensors(weights), assign=True)   # weights now file-backed (lazy)
    malloc_trim()
    calib = [torch.randint(5, 4096, (4, 128), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    base = rss_anon_mib()
    cfg = {"samples": 8, **({"max_memory": budget} if budget else {})}
    cfg.update({"bits": 4, "group_size": 128, "pack": True} if step == "gptq" else {"sparsity": 0.5})
    ctx = Context(calib_data=calib, progress=False)
    ctx.report.begin_step(step, cfg)
    t = time.perf_counter()
    with PeakSampler() as ps:
        STEPS.get(step)(STEPS.get(step).Config(**cfg), 0).run(model, ctx)
    return {"seconds": time.perf_counter() - t, "rss_anon_before_mib": base, "peak_rss_anon_mib": ps.peak,
            "model_mib": model_mib, "figures": ctx.report.steps[-1]["figures"]}


def child_generate(variant: str, new: int) -> dict:
    """Steady and peak anonymous memory while generating with the fp32 or packed model."""
    import gc

    torch.set_num_threads(1)
    model = build()[0]
    if variant != "fp32":
        model = quantize(model, [("rtn", {"bits": int(variant[-1]), "group_size": 128})])
    gc.collect()
    malloc_trim()
    prompt = torch.randint(5, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    steady = rss_anon_mib()
    with PeakSampler() as ps, torch.no_grad():
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return {"steady_rss_anon_mib": steady, "peak_rss_anon_mib": ps.peak, "weight_mib": weight_bytes(model) / 2**20}


def memory_tables(new: int) -> None:
    # A fixed mmap threshold: glibc then returns every freed tensor of >= 128 KiB to the OS at once
    # (by default the threshold grows after frees and freed heap memory stays resident), so RssAnon
    # follows the live tensors. The same setting for every row.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}

    def run(*a):
        out = subprocess.run([sys.executable, __file__, "--child", *a], capture_output=True, text=True, check=True,
                             env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    print("\nPeak anonymous RSS while generating (own process each; RssAnon sampled every 1 ms; file-backed pages "
          "excluded):")
    print("| model | weight MiB | RssAnon before generate MiB | peak RssAnon during generate MiB |")
    print("|---|---|---|---|")
    for v in ("fp32", "int8", "int4"):
        r = run("generate", v, str(new))
        print(f"| {v} | {r['weight_mib']:.1f} | {r['steady_rss_anon_mib']:.0f} | {r['peak_rss_anon_mib']:.0f} |",
              flush=True)

    from safetensors.torch import save_file

    print("\nBlock-wise steps on a model loaded memory-mapped from safetensors; anonymous memory during the "
          "step (own process each):")
    print("| model | step | max_memory | model MiB | blocks offloaded | resident weights MiB (planned) "
          "| RssAnon before MiB | peak RssAnon MiB | peak - before MiB | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, step, budgets in (("default", "gptq", (None, "24MiB")), ("large", "wanda", (None, "120MiB"))):
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "w.safetensors")
            model = big_model(size)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
            del model
            for budget in budgets:
                r = run("compress", path, size, step, budget or "")
                f = r["figures"]
                print(f"| {size} | {step} | {budget or 'none (in memory)'} | {r['model_mib']:.1f} | "
                      f"{bool(f.get('offloaded_blocks'))} | {f.get('resident_weights_mib', float('nan')):.1f} | "
                      f"{r['rss_anon_before_mib']:.0f} | {r['peak_rss_anon_mib']:.0f} | "
                      f"{r['peak_rss_anon_mib'] - r['rss_anon_before_mib']:.0f} | {r['seconds']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--variants", type=int, nargs="+", help="rows to run (indices, default all); 0 = fp32 always runs")
    ap.add_argument("--memory", action="store_true", help="also the peak-memory tables (subprocesses)")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--model", choices=["pylm", "smollm2"], default="pylm",
                    help="smollm2: decode speed at the memory limit on SmolLM2-135M (bench/smollm2_decode.py)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model == "smollm2":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from smollm2_decode import main as smollm2_main

        smollm2_main(["--threads", *map(str, args.threads), "--runs", str(args.runs), "--new", str(args.new)])
        return
    if args.child:
        kind, *rest = args.child
        r = (child_compress(rest[0], rest[1], rest[2], rest[3] or None) if kind == "compress"
             else child_generate(rest[0], int(rest[1])))
        print(json.dumps(r))
        return
    if args.memory_only:
        memory_tables(args.new)
        return

    base, which = build()
    prompt = torch.randint(5, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    g128 = {"group_size": 128, "symmetric": True}
    variants = [
        ("fp32", [], "-"),
        ("int8 g128 blocks", [("rtn", {"bits": 8, **g128})], "c"),
        ("int4 g128 blocks", [("rtn", {"bits": 4, **g128})], "c"),
        ("int4 g128 blocks + int8 lm_head", [("rtn", {"bits": 4, **g128}),
                                             ("rtn", {"bits": 8, "group_size": 128, "targets": ["lm_head"]})], "c"),
        ("int4 g128 blocks (torch aten int4 kernel)", [("rtn", {"bits": 4, **g128})], "aten"),
        ("int4 g128 blocks (dequantize per call)", [("rtn", {"bits": 4, **g128})], "dequant"),
    ]
    if args.variants:
        variants = [v for i, v in enumerate(variants) if i == 0 or i in args.variants]
    models = {}
    for _name, steps, _ in variants:
        key = repr(steps)
        if key not in models:
            m = build()[0]
            m.load_state_dict(base.state_dict())
            models[key] = quantize(m.eval(), steps)
    fp32_bytes = weight_bytes(models[repr([])])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"model: {which}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters; CPU: {cpu}; "
          f"torch {torch.__version__}; prompt 16, new {args.new}, median of {args.runs}")
    print("| variant | backend | weight MiB | vs fp32 | "
          + " | ".join(f"tok/s {t}T | vs fp32 {t}T" for t in args.threads) + " |")
    print("|---|---|---|---|" + "---|---|" * len(args.threads))
    ref_rate, ref_tokens = {}, {}
    for name, steps, backend in variants:
        model = models[repr(steps)]
        os.environ["NNSQUEEZE_PACKED_BACKEND"] = "auto" if backend in ("c", "-") else backend
        cells = []
        for t in args.threads:
            torch.set_num_threads(t)
            rate, out = tokens_per_s(model, prompt, args.new, args.runs)
            if not steps:
                ref_rate[t] = rate
            cells += [f"{rate:.1f}", f"{rate / ref_rate[t]:.2f}x"]
            ref_tokens[(repr(steps), backend)] = out
        mib = weight_bytes(model) / 2**20
        print(f"| {name} | {backend} | {mib:.1f} | {fp32_bytes / 2**20 / mib:.2f}x less | " + " | ".join(cells) + " |",
              flush=True)
    os.environ.pop("NNSQUEEZE_PACKED_BACKEND", None)
    # the kernels must pick the same greedy tokens as dequantize-per-call on the same packed model
    key = repr([("rtn", {"bits": 4, **g128})])
    for backend in ("c", "aten"):
        if (key, backend) not in ref_tokens or (key, "dequant") not in ref_tokens:
            continue
        print(f"int4 [{backend}] greedy tokens identical to dequantize-per-call: "
              f"{bool(torch.equal(ref_tokens[(key, backend)], ref_tokens[(key, 'dequant')]))}")
    if args.memory:
        memory_tables(args.new)


if __name__ == "__main__":
    main()
