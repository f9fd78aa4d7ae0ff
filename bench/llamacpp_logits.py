"""llama.cpp's logits and decode speed on the GGUF files nnsqueeze writes (issue 11).

Two processes. This script, run with the project's Python, quantizes a model with ``rtn`` (symmetric,
group 32, fp16 scales: the schemes GGUF's ``Q4_0`` / ``Q8_0`` hold exactly), computes nnsqueeze's
reference logits on its packed model, writes the GGUF files, and runs *itself* again with the Python of
a venv holding a prebuilt llama.cpp (``--llama-python``; PyPI's ``llama-cpp-cffi`` 0.3.1, CPU build:
``python -m venv V && V/bin/pip install --no-deps llama-cpp-cffi==0.3.1 && V/bin/pip install cffi numpy``).
That side imports only numpy and the package's cffi extension (``llama/_llama_cpp_cpu*.so``, loaded by
path: the package's ``__init__`` wants transformers and numba), evaluates the same token ids and
writes llama.cpp's logits back; this side compares.

Per model (``tiny``: a random 2-layer LLaMA with a 97-token BPE vocabulary; ``smollm2``: SmolLM2-135M-
Instruct from :mod:`nnsqueeze.zoo.smollm2`) and scheme (int4 -> Q4_0, int8 -> Q8_0), three GGUF files:

- ``export``: nnsqueeze's ``save_pretrained(format="gguf")`` (Q4_0/Q8_0 blocks, the rest F32);
- ``deq-f32``: the same weights dequantized (codes x fp16 scale, exact in float32) as F32 tensors,
  written here with the exporter's names, row permutation and metadata: llama.cpp's float path on
  nnsqueeze's exact weights, so what differs is llama.cpp's float arithmetic, not the format;
- ``deq-f16``: those weights rounded to F16 (llama.cpp then rounds activations to F16 too).

Reported against nnsqueeze's packed model (fp32): max |logit diff| (absolute and relative to the largest
|logit|), top-1 agreement over the prompt's positions, and whether 16 greedy tokens are equal. The
float64 forward of the dequantized model is an independent reference row. llama.cpp runs with an F32 KV
cache here (its default is F16). ``--speed`` instead times decoding (16-token prompt, ``--new`` greedy
tokens, median of ``--runs``) of llama.cpp on the Q4_0/Q8_0/F32 files next to nnsqueeze's packed model
with the same weights, per thread count, under ``--lock`` taken exclusively::

    python bench/llamacpp_logits.py --llama-python /work/venvs/llcpp031/bin/python --models tiny smollm2
    python bench/llamacpp_logits.py --llama-python /work/venvs/llcpp031/bin/python --speed --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GREEDY = 16


# ----------------------------------------------------------------------------------- llama.cpp side
def _llama_lib():
    import importlib.util

    spec = importlib.util.find_spec("llama")        # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llama-cpp-cffi is not installed in this Python (pip install --no-deps llama-cpp-cffi)")
    so = next(Path(spec.submodule_search_locations[0]).glob("_llama_cpp_cpu*.so"))
    ext = importlib.util.spec_from_file_location("_llama_cpp_cpu", so)
    mod = importlib.util.module_from_spec(ext)
    ext.loader.exec_module(mod)
    return mod.lib, mod.ffi


class Llama:
    """One llama.cpp model + context through the C API (batch of one sequence)."""

    def __init__(self, lib, ffi, path: str, threads: int, n_ctx: int, f32_kv: bool):
        self.lib, self.ffi = lib, ffi
        self.model = lib.llama_load_model_from_file(path.encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise SystemExit(f"llama.cpp could not load {path}")
        p = lib.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = n_ctx
        p.n_threads = p.n_threads_batch = threads
        if f32_kv:
            p.type_k = p.type_v = 0                      # GGML_TYPE_F32
        self.ctx = lib.llama_new_context_with_model(self.model, p)
        self.n_vocab = lib.llama_n_vocab(self.model)
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)
        self.pos = 0

    def reset(self) -> None:
        self.lib.llama_kv_cache_clear(self.ctx)
        self.pos = 0

    def eval(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Logits (len(ids) or 1, n_vocab) after appending ``ids`` to the sequence."""
        b = self.batch
        b.n_tokens = len(ids)
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, self.pos + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")
        self.pos += len(ids)
        rows = range(len(ids)) if all_logits else [len(ids) - 1]
        return np.stack([np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(self.ctx, i), 4 * self.n_vocab),
                                       np.float32).copy() for i in rows])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.reset()
        out = [int(self.eval(ids)[-1].argmax())]
        while len(out) < n:
            out.append(int(self.eval(out[-1:])[-1].argmax()))
        return out

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_free_model(self.model)


def llama_side(job_file: str) -> None:
    lib, ffi = _llama_lib()
    quiet = ffi.callback("void(enum ggml_log_level, char *, void *)", lambda *a: None)
    lib.llama_log_set(quiet, ffi.NULL)
    lib.llama_backend_init()
    job = json.loads(Path(job_file).read_text())
    res = {"system_info": ffi.string(lib.llama_print_system_info()).decode().strip(), "logits": {}, "speed": {}}
    for name, t in job.get("logits", {}).items():
        m = Llama(lib, ffi, t["gguf"], t["threads"], 256, f32_kv=True)
        np.save(t["out"], m.eval(t["ids"], all_logits=True))
        res["logits"][name] = m.greedy(t["ids"], GREEDY)
        m.close()
    for name, t in job.get("speed", {}).items():
        m = Llama(lib, ffi, t["gguf"], t["threads"], 256, f32_kv=False)
        rates = []
        for _ in range(t["runs"] + 1):                   # the first is a warm-up
            m.reset()
            nxt = int(m.eval(t["ids"])[-1].argmax())
            start = time.perf_counter()
            for _ in range(t["new"]):
                nxt = int(m.eval([nxt])[-1].argmax())
            rates.append(t["new"] / (time.perf_counter() - start))
        res["speed"][name] = statistics.median(rates[1:])
        m.close()
    Path(job["result"]).write_text(json.dumps(res))


def run_llama(python: str, job: dict, tmp: Path) -> dict:
    job = {**job, "result": str(tmp / "result.json")}
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "LLAMA_CPP_BACKEND": "cpu"}
    subprocess.run([python, __file__, "--llama-side", str(tmp / "job.json")], check=True, env=env)
    return json.loads((tmp / "result.json").read_text())


# ------------------------------------------------------------------------------------- nnsqueeze side
def _torchvision_ok() -> None:
    """transformers imports torchvision when it is installed; PyPI's CUDA torchvision beside the CPU torch
    needs nnsqueeze's shim first (it logs a warning saying so)."""
    from nnsqueeze.zoo.tvision import import_torchvision

    try:
        import_torchvision()
    except ImportError:
        pass                                          # not installed: transformers does not import it


def tiny_model():
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"]:
        vocab[ch] = len(vocab)
    merges = []
    for a in "etaoinsh":
        for b in "etaoinsh":
            if len(vocab) < 97:
                merges.append((a, b))
                vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")
    ids = torch.randint(3, 97, (1, 37), generator=torch.Generator().manual_seed(1)).tolist()[0]
    return transformers.LlamaForCausalLM(cfg).eval(), tok, ids


def load(name: str):
    if name == "tiny":
        return tiny_model()
    import json as _json

    from nnsqueeze.hf_io import load_model
    from nnsqueeze.zoo import smollm2

    model, tok = load_model(str(smollm2.model_dir()))
    text = _json.__doc__[:400]
    return model.eval(), tok, tok(text)["input_ids"][:64]


def rtn(model, bits: int):
    import copy

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llm_generate import quantize

    return quantize(copy.deepcopy(model), [("rtn", {"bits": bits, "group_size": 32, "symmetric": True,
                                                   "scale_dtype": "fp16"})])


def dense_weights(q) -> dict:
    """Every tensor of ``q``'s state dict with packed layers as their dequantized float32 weight."""
    from nnsqueeze.export.hf_formats import float_tensors
    from nnsqueeze.llm.packed import PackedLinear

    layers = {n: m for n, m in q.named_modules() if isinstance(m, PackedLinear)}
    out = float_tensors(q, layers)
    out.update({f"{n}.weight": m.dequantized_weight().float() for n, m in layers.items()})
    return out


def float_gguf(q, tok, path: Path, float_type: str) -> None:
    """The (dequantized) weights of ``q`` (packed or not) as an F32 (or F16 for 2-D tensors) llama GGUF,
    laid out as the exporter lays out its files."""
    import gguf
    import torch

    from nnsqueeze.export import gguf_format as gf

    cfg = q.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    w = gguf.GGUFWriter(path, "llama")
    gf._metadata(w, cfg, {"Q8_0"})
    for kv in w.kv_data:
        kv.pop(gguf.Keys.General.FILE_TYPE, None)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    gf._tokenizer(w, tok, cfg.vocab_size)
    for key, t in dense_weights(q).items():
        if key.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and key == "lm_head.weight"):
            continue
        name = gf.gguf_name(key)
        role = name.split(".")[2] if name.startswith("blk.") else ""
        if role in heads:
            t = t[gf.rope_rows(t.shape[0], heads[role])]
        dt = torch.float16 if float_type == "f16" and t.dim() == 2 else torch.float32
        w.add_tensor(name, t.to(dt).contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def nnsqueeze_greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` argmax tokens with the KV cache (not ``generate``: its ``min_new_tokens`` masks EOS, which
    llama.cpp's plain argmax does not)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        while len(toks) < n:
            out = model(torch.tensor([toks[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


def q8_0_inputs(model, noise: int | None = None) -> list:
    """Forward pre-hooks that round every packed layer's input as llama.cpp's ``quantize_row_q8_0`` does
    before its Q4_0/Q8_0 dot products: blocks of 32, ``code = round(x * 127 / absmax)``, value ``code * d``
    with ``d = absmax / 127`` stored as float16. ``noise`` (a seed): first move each input by -1, 0 or +1
    float32 ulp at random, to measure how far rounding flips alone carry the logits. Returns the handles."""
    import torch

    from nnsqueeze.llm.packed import PackedLinear

    gen = None if noise is None else torch.Generator().manual_seed(noise)

    def hook(mod, args):
        x = args[0]
        if gen is not None:
            x = x * (1 + 2.0**-23 * torch.randint(-1, 2, x.shape, generator=gen).to(x.dtype))
        blk = x.reshape(-1, 32)
        amax = blk.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
        return (torch.round(blk * inv) * (amax / 127).half().float()).reshape(x.shape),

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, PackedLinear)]


def reference(q, ids: list[int]):
    """(logits at the prompt's positions, greedy tokens, top-1 minus top-2 logit where each greedy token
    was chosen) of nnsqueeze's model ``q``."""
    import torch

    greedy = nnsqueeze_greedy(q, ids, GREEDY)
    with torch.no_grad():
        ref = q(torch.tensor([ids])).logits[0].float().numpy()
        forced = q(torch.tensor([ids + greedy])).logits[0, len(ids) - 1:-1].float()
    top2 = forced.topk(2, -1).values
    return ref, greedy, (top2[:, 0] - top2[:, 1]).numpy()


def accuracy(args, models: list[str]) -> None:
    import torch

    from nnsqueeze.export.hf_formats import save_pretrained

    torch.set_num_threads(1)
    for mname in models:
        fp32, tok, ids = load(mname)
        print(f"\n{mname}: {sum(p.numel() for p in fp32.parameters()) / 1e6:.2f}M parameters, {len(ids)} prompt "
              f"tokens, {GREEDY} greedy tokens")
        print("| scheme | logits of | against | max abs diff | / max abs logit | top-1 agree | greedy equal |")
        print("|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as d:
            tmp, job, rows = Path(d), {"logits": {}}, []
            for bits, qname in ((4, "Q4_0"), (8, "Q8_0")):
                q = rtn(fp32, bits)
                ref = reference(q, ids)
                sims = []
                for noise in (None, 0):
                    hooks = q8_0_inputs(q, noise)
                    sims.append(reference(q, ids))
                    for h in hooks:
                        h.remove()
                sim = sims[0]
                nsq, nsq_sim = "nnsqueeze packed", "nnsqueeze packed, Q8_0-rounded inputs"
                if sum(p.numel() for p in fp32.parameters()) <= args.f64_max * 1e6:
                    dense = type(fp32)(fp32.config).double().eval()
                    dense.load_state_dict({k: v.double() for k, v in dense_weights(q).items()}, strict=True)
                    with torch.no_grad():
                        f64 = dense(torch.tensor([ids])).logits[0].numpy()
                    rows.append((qname, "float64 dequantized (torch)", nsq, ref, f64, None))
                    del dense
                else:
                    rows.append((qname, f"float64 reference not run (over --f64-max {args.f64_max}M parameters)",
                                 nsq, None, None, None))
                rows.append((qname, f"{nsq_sim} after ±1-ulp input noise", nsq_sim, sim, *sims[1][:2]))
                save_pretrained(q, tmp / qname, format="gguf", tokenizer=tok)
                files = {"export": tmp / qname / "model.gguf"}
                for ft in ("f32", "f16"):
                    files[f"deq-{ft}"] = tmp / f"{qname}-{ft}.gguf"
                    float_gguf(q, tok, files[f"deq-{ft}"], ft)
                for kind, f in files.items():
                    key = f"{qname}/{kind}"
                    job["logits"][key] = {"gguf": str(f), "ids": ids, "threads": 1, "out": str(tmp / f"{key}.npy")}
                    rows.append((qname, f"llama.cpp, {kind}.gguf", nsq, ref, key, "tokens"))
                    if kind == "export":
                        rows.append((qname, f"llama.cpp, {kind}.gguf", nsq_sim, sim, key, "tokens"))
                del q
            res = run_llama(args.llama_python, job, tmp)
            for qname, label, against, ref, lg, toks in rows:
                if ref is None:
                    print(f"| {qname} | {label} | | | | | |")
                    continue
                ref_logits, greedy, margin = ref
                if isinstance(lg, str):
                    lg, toks = np.load(job["logits"][lg]["out"]), res["logits"][lg]
                diff = float(np.abs(lg - ref_logits).max())
                top1 = float((lg.argmax(-1) == ref_logits.argmax(-1)).mean())
                first = None if toks is None else next((i for i, (a, b) in enumerate(zip(toks, greedy)) if a != b),
                                                       None)
                same = "-" if toks is None else "yes" if first is None else \
                    f"no: from token {first} (margin there {margin[first]:.2e})"
                print(f"| {qname} | {label} | {against} | {diff:.2e} | {diff / np.abs(ref_logits).max():.2e} | "
                      f"{100 * top1:.1f}% | {same} |")
    print(f"\nllama.cpp: {res['system_info']}")


def speed(args) -> None:
    import fcntl
    from datetime import datetime, timezone

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2_decode import decode, isa_flags

    from nnsqueeze.env import cpu_model

    lock = open(args.lock, "a+")
    fcntl.flock(lock, fcntl.LOCK_SH)
    torch.set_num_threads(1)
    fp32, tok, _ = load("smollm2")
    prompt = torch.randint(5, fp32.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    q4, q8 = rtn(fp32, 4), rtn(fp32, 8)
    rows = [("fp32 / F32", fp32, "float", "F32"), ("int4 g32 / Q4_0", q4, "float", "Q4_0"),
            ("int4 g32 + int8 act. / Q4_0", q4, "int8", None), ("int8 g32 / Q8_0", q8, "float", "Q8_0"),
            ("int8 g32 + int8 act. / Q8_0", q8, "int8", None)]
    fcntl.flock(lock, fcntl.LOCK_UN)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        from nnsqueeze.export.hf_formats import save_pretrained

        files = {"F32": tmp / "f32.gguf"}
        float_gguf(fp32, tok, files["F32"], "f32")
        files["Q4_0"] = save_pretrained(q4, tmp / "q4", format="gguf", tokenizer=tok) / "model.gguf"
        files["Q8_0"] = save_pretrained(q8, tmp / "q8", format="gguf", tokenizer=tok) / "model.gguf"
        for t in args.threads:
            fcntl.flock(lock, fcntl.LOCK_EX)
            torch.set_num_threads(t)
            start = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            job = {"speed": {k: {"gguf": str(f), "ids": prompt[0].tolist(), "threads": t, "new": args.new,
                                 "runs": args.runs} for k, f in files.items()}}
            res = run_llama(args.llama_python, job, tmp)
            print(f"\n{t} thread(s), {start}; CPU: {cpu_model()} ({isa_flags()}); torch {torch.__version__}; "
                  f"prompt 16, {args.new} new tokens, median of {args.runs}; llama.cpp: {res['system_info']}")
            print("| weights (nnsqueeze / GGUF) | nnsqueeze tok/s | llama.cpp tok/s | llama.cpp / nnsqueeze |")
            print("|---|---|---|---|")
            for name, model, act, gg in rows:
                os.environ["NNSQUEEZE_PACKED_ACT"] = act
                decode(model, prompt, 4)
                rate = statistics.median(args.new / decode(model, prompt, args.new)[0] for _ in range(args.runs))
                ll = res["speed"].get(gg) if gg else None
                print(f"| {name} | {rate:.1f} | {'-' if ll is None else f'{ll:.1f}'} | "
                      f"{'-' if ll is None else f'{ll / rate:.2f}x'} |", flush=True)
            os.environ["NNSQUEEZE_PACKED_ACT"] = "float"
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_CPP_PYTHON", "/work/venvs/llcpp031/bin/python"))
    ap.add_argument("--llama-side", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--f64-max", type=float, default=10.0,
                    help="float64 reference forward only for models up to this many million parameters (memory)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--lock", default="/tmp/cpu.lock")
    args = ap.parse_args(argv)
    if args.llama_side:
        llama_side(args.llama_side)
        return
    _torchvision_ok()
    if args.speed:
        speed(args)
    else:
        accuracy(args, args.models)


if __name__ == "__main__":
    main()
