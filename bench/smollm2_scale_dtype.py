"""SmolLM2-135M perplexity of W4 g64 RTN and GPTQ (act order) for each ``scale_dtype`` (fp32, fp16, fp16-exact),
symmetric and asymmetric: what the coarser fp16-exact scales cost (BENCHMARKS.md, the gptq-load section).
Same tokens as bench/smollm2.py (16 calibration windows, 16 evaluation windows)::

    python bench/smollm2_scale_dtype.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_ppl import via_recipe  # noqa: E402
from smollm2 import SEQ_LEN, calibration, eval_tokens  # noqa: E402

from nnsqueeze.hf_io import load_model  # noqa: E402
from nnsqueeze.llm.perplexity import perplexity  # noqa: E402
from nnsqueeze.zoo import smollm2  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tok = load_model(smollm2.model_dir(), task="causal-lm")
    calib = list(calibration(tok, 16).split(8))
    val = eval_tokens(tok)[: 16 * SEQ_LEN]
    for sym in (True, False):
        for sd in ("fp32", "fp16", "fp16-exact"):
            for method in ("rtn", "gptq"):
                cfg = {"bits": 4, "group_size": 64, "symmetric": sym, "scale_dtype": sd, "pack": False}
                if method == "gptq":
                    cfg.update(act_order=True, samples=16)
                m, _ = via_recipe([{method: cfg}])(model, calib)
                r = perplexity(m, val, seq_len=SEQ_LEN, max_windows=16)
                print(f"{method} W4 g64 {'sym' if sym else 'asym'} scale_dtype {sd}: ppl {r.ppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
