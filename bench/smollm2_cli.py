"""Issue 11's acceptance command on SmolLM2-135M, as a new user runs it, then its output reloaded by transformers.

    nnsqueeze compress --model <smollm2 dir> --data <text file> --recipe w4-g128-gptq \
        --format compressed-tensors --out d

- **text file**: the standard library's module docstrings (``nnsqueeze.zoo.pycorpus``), joined by blank lines,
  the first documents up to 500,000 characters; the CLI cuts it into ``--samples`` (32) calibration windows of
  ``--seq-len`` (512) tokens and evaluation windows from the rest.
- **the run**: a subprocess, timed (wall seconds), with its report (``d/nnsqueeze_report.json``): perplexity
  before and after, and the layers whose group changed (SmolLM2's 576-wide layers: 128 does not divide them,
  and compressed-tensors has no shorter last group, so the CLI gives them group 64; down_proj keeps 128).
- **the check**: transformers ``from_pretrained`` (with the ``compressed-tensors`` package) loads ``d``; its
  perplexity on the same evaluation windows must equal the report's, and it generates 24 greedy tokens.

    python bench/smollm2_cli.py            # about 17 minutes on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnsqueeze import hf_io
from nnsqueeze.env import cpu_model
from nnsqueeze.metrics import perplexity
from nnsqueeze.zoo import pycorpus, smollm2

CHARS = 500_000


def text() -> str:
    out, n = [], 0
    for d in pycorpus.documents():
        if d.name.startswith("module:"):
            if n + len(d.text) > CHARS:
                break
            out.append(d.text)
            n += len(d.text) + 2
    return "\n\n".join(out)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def main() -> None:
    import transformers

    model_dir = smollm2.model_dir()
    with tempfile.TemporaryDirectory(prefix="nsq-cli-") as tmp:
        data = Path(tmp) / "docs.txt"
        data.write_text(text())
        out = Path(tmp) / "d"
        cmd = [sys.executable, "-m", "nnsqueeze", "compress", "--model", str(model_dir), "--data", str(data),
               "--recipe", "w4-g128-gptq", "--format", "compressed-tensors", "--out", str(out)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"nnsqueeze compress exited {p.returncode}:\n{p.stderr[-3000:]}")
        report = json.loads((out / "nnsqueeze_report.json").read_text())
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        groups = {g["weights"]["group_size"]: len(g["targets"]) for g in qc["config_groups"].values()}
        tok = transformers.AutoTokenizer.from_pretrained(out)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        windows = hf_io.load_text_data(str(data), tok, seq_len=512, samples=32)["eval"]
        with torch.no_grad():
            ppl = perplexity(Logits(loaded), windows)
            ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
            gen = tok.decode(loaded.generate(ids, max_new_tokens=24, do_sample=False)[0])
        size = sum(f.stat().st_size for f in out.iterdir())
    b, c = report["baseline"], report["compressed"]
    notes = [n["note"] for n in report["notes"] if n["step"] == "gptq"]
    print(f"CPU: {cpu_model()}  torch threads: {torch.get_num_threads()}  text: {len(text()):,} characters")
    print(f"command: nnsqueeze {' '.join(cmd[3:])}")
    print("| figure | value |\n|---|---|")
    print(f"| exit code | {p.returncode} |")
    print(f"| wall time | {wall:.0f} s |")
    print(f"| perplexity, fp32 (report) | {b['accuracy']:.4f} |")
    print(f"| perplexity, compressed (report, ONNX Runtime) | {c['accuracy']:.4f} |")
    print(f"| perplexity, compressed (report, torch) | {c['accuracy_torch']:.4f} |")
    print(f"| perplexity, `d` loaded by transformers + compressed-tensors | {ppl:.4f} |")
    print(f"| config groups (group size: layers) | {groups} |")
    print(f"| ONNX Runtime latency ms, fp32 -> compressed (batch {b['measured']['latency_batch']}) | "
          f"{b['latency_ms']['onnxruntime']:.0f} -> {c['latency_ms']['onnxruntime']:.0f} "
          f"({c['latency_runs']['onnxruntime']} runs) |")
    print(f"| directory size | {size / 2**20:.1f} MiB |")
    print(f"\ngptq notes: {notes}")
    print(f"greedy: {gen!r}")


if __name__ == "__main__":
    main()
