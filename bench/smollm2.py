"""Benchmark: SmolLM2-135M-Instruct (fp32), nnsqueeze vs llm-compressor 0.14 on the same settings.

Same model weights (:mod:`nnsqueeze.zoo.smollm2`, the Q4_1 GGUF converted once to fp32), same
calibration windows, same perplexity protocol (:mod:`nnsqueeze.llm.perplexity`, as
``bench/llm_ppl.py``) and the same thread count for both tools:

- **calibration**: ``--calib`` (32) windows of 256 tokens of standard-library *docstrings* (the
  ``module:`` documents of :mod:`nnsqueeze.zoo.pycorpus`, sorted by name, tokenized with SmolLM2's
  tokenizer, joined by EOS, cut into non-overlapping windows; ``--calib`` of them drawn with ``--calib-seed`` (0),
  kept in stream order, or in the order ``--calib-order`` gives; both tools see them in that order:
  llm-compressor gets them as a ``DataLoader``, not shuffled);
- **perplexity text**: the ``#`` comments of a fixed, ordered list of stdlib files (:data:`EVAL_FILES`;
  one comment per line, files joined by a blank line), a text disjoint from the docstrings; the first
  ``--eval-windows`` non-overlapping 256-token windows, the first token of each unscored. The
  tokens' sha256 is recorded for both tools, and ``--merge`` refuses runs on different tokens.

Methods (only Linears inside the decoder blocks; ``lm_head``/embeddings stay fp32): RTN, GPTQ (act
order, static groups), AWQ, AWQ+GPTQ at W4/W3 with groups of 128 and 64 (SmolLM2's hidden size 576
is not a multiple of 128: nnsqueeze uses a short last group of 64; llm-compressor refuses such
layers, so both tools also run at group 64); nnsqueeze's ``rotate`` + RTN and ``rotate`` + GPTQ with
the Hessian-weighted MSE clip (preset ``w4-g128-quarot-gptq``); SmoothQuant (alpha 0.5) + W8A8
(int8 per-channel symmetric weights, int8 per-tensor asymmetric static activations); SparseGPT and
Wanda at 50% and 2:4. Calibration seconds = the tool's compression call only (no evaluation).
Each tool runs with its own defaults otherwise: llm-compressor's symmetric grid is ``absmax / 7.5``
(the positive end clipped), nnsqueeze's ``absmax / 7`` (ONNX Runtime's); its static activation
observer is a moving-average min/max (nnsqueeze: the global min/max); its AWQ folds the scales into
the preceding norm/Linear per mapping, nnsqueeze's searches one scale vector per Linear. The rows
``... full range`` run nnsqueeze on llm-compressor's grid (``full_range: true``), ``SmoothQuant a=0.5
ema`` with its observer (``calibration: {method: ema-minmax}``, one window per batch as oneshot's
default batch size), ``AWQ+GPTQ (recipe)`` as one recipe, ``awq: {share_scales: true, fold: true}``
then ``gptq`` (``AWQ+GPTQ``: the older bench-only composition with per-Linear scales, unfolded).
A setting a tool refuses (llm-compressor: group 128 on 576-wide layers) is a row with its error.

One tool per process (llm-compressor lives in its own venv), then merge::

    python bench/smollm2.py --tool nnsqueeze --json /tmp/nsq.json
    /work/venvs/llmc/bin/python bench/smollm2.py --tool llmcompressor --json /tmp/llmc.json
    python bench/smollm2.py --merge /tmp/nsq.json /tmp/llmc.json     # table + bench/results/smollm2-DATE.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import sys
import sysconfig
import time
import tokenize
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_ppl import W8A8, awq_gptq, via_recipe, with_samples  # noqa: E402  (one protocol, shared helpers)

from nnsqueeze.env import cpu_model  # noqa: E402
from nnsqueeze.hf_io import load_model  # noqa: E402
from nnsqueeze.llm.perplexity import perplexity  # noqa: E402
from nnsqueeze.zoo import pycorpus, smollm2  # noqa: E402

SEQ_LEN = 256
#: The perplexity text: '#' comments of these stdlib files, in this order.
EVAL_FILES = ("argparse.py", "asyncio/base_events.py", "collections/__init__.py", "dataclasses.py", "functools.py",
              "inspect.py", "pathlib.py", "shutil.py", "subprocess.py", "tarfile.py", "threading.py", "typing.py",
              "zipfile.py", "pickle.py", "datetime.py", "enum.py", "ssl.py", "logging/__init__.py")
#: (bits, group) of the weight-only rows, in run order (the head-to-head g64 rows before the 3-bit ones).
GRIDS = ((4, 128), (4, 64), (3, 128), (3, 64))
ORDER = ["fp32", "W4 g128", "W4 g64", "W8A8", "50% unstructured", "2:4", "W3 g128", "W3 g64"]
METHODS = ["fp32", "RTN", "RTN full range", "GPTQ (act order)", "GPTQ (act order) full range", "AWQ",
           "AWQ full range", "AWQ+GPTQ", "AWQ+GPTQ full range", "AWQ+GPTQ (recipe)", "AWQ+GPTQ (recipe) full range",
           "rotate+RTN", "rotate+GPTQ+mse clip", "SmoothQuant a=0.5", "SmoothQuant a=0.5 ema",
           "SmoothQuant a=0.5 ema range", "SparseGPT", "Wanda"]


# --------------------------------------------------------------------------- data (same for both tools)

def calibration(tok, n: int, seed: int = 0, eos: int | None = None) -> torch.Tensor:
    """``n`` windows (n, 256) of stdlib docstrings joined by ``eos`` (default: the tokenizer's), drawn with
    ``seed`` from the joined stream."""
    ids: list[int] = []
    eos = tok.eos_token_id if eos is None else eos
    for d in pycorpus.documents():
        if d.name.startswith("module:"):
            ids += tok(d.text, add_special_tokens=False)["input_ids"] + [eos]
    windows = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return windows[pick]


def comments() -> str:
    """The ``#`` comments of :data:`EVAL_FILES` (``#`` and surrounding space stripped, empty ones dropped)."""
    root, out = Path(sysconfig.get_paths()["stdlib"]), []
    for name in EVAL_FILES:
        src = (root / name).read_text(encoding="utf-8")
        lines = [t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                 if t.type == tokenize.COMMENT]
        out.append("\n".join(x for x in lines if x and not x.startswith("!")))
    return "\n\n".join(out)


def eval_tokens(tok) -> torch.Tensor:
    return torch.tensor(tok(comments(), add_special_tokens=False)["input_ids"])


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- nnsqueeze

def one_window(run):
    """``run`` on the same calibration windows, one per batch."""
    return lambda model, calib: run(model, list(torch.cat(calib).split(1)))


def nnsqueeze_methods(n: int) -> list[tuple[str, str, object]]:
    q = lambda steps: via_recipe(with_samples(steps, n))  # noqa: E731
    rot = {"rotate": {"rotation": "hadamard", "seed": 0, "online_hadamard": True}}
    clip = {"method": "mse", "grid": 20, "min_ratio": 0.5}
    out: list[tuple[str, str, object]] = [("fp32", "fp32", None)]
    for bits, g in GRIDS:
        wq, wl = {"bits": bits, "group_size": g, "symmetric": True}, f"W{bits} g{g}"
        for tag, full in (("", {}), (" full range", {"full_range": True})):
            fq = {**wq, **full}
            out += [(wl, "RTN" + tag, via_recipe([{"rtn": {**fq, "pack": False}}])),
                    (wl, "GPTQ (act order)" + tag, q([{"gptq": {**fq, "act_order": True, "pack": False}}])),
                    (wl, "AWQ" + tag, q([{"awq": fq}])),
                    (wl, "AWQ+GPTQ (recipe)" + tag, q([{"awq": {**fq, "share_scales": True, "fold": True}},
                                                      {"gptq": {**fq, "act_order": True, "pack": False}}]))]
        out += [(wl, "AWQ+GPTQ", awq_gptq(wq))]
        if g == 128:
            out += [(wl, "rotate+RTN", via_recipe([rot, {"rtn": {**wq, "pack": False}}])),
                    (wl, "rotate+GPTQ+mse clip", via_recipe([rot, {"gptq": {**wq, "act_order": True, "pack": False,
                                                                             "samples": n, "clip": clip}}]))]
        if (bits, g) == (4, 64):  # the head-to-head rows that need no group: after the first g64 block
            out += [("W8A8", "SmoothQuant a=0.5", q([{"smoothquant": {"alpha": 0.5}}, {"quantize": W8A8}]))]
            # llm-compressor's static activation observer: a moving average (0.01) of each batch's min/max,
            # over batches of one window (oneshot's default batch size): the same here, on the same windows.
            ema = with_samples([{"smoothquant": {"alpha": 0.5}}, {"quantize": W8A8}], n)
            ema[1]["quantize"]["calibration"]["method"] = "ema-minmax"
            out += [("W8A8", "SmoothQuant a=0.5 ema", one_window(via_recipe(ema)))]
            # llm-compressor's smoothing statistic: the per-channel range max - min instead of max |x|
            rng = copy.deepcopy(ema)
            rng[0]["smoothquant"]["statistic"] = "range"
            out += [("W8A8", "SmoothQuant a=0.5 ema range", one_window(via_recipe(rng)))]
            out += [("50% unstructured", "SparseGPT", q([{"sparsegpt": {"sparsity": 0.5}}])),
                    ("50% unstructured", "Wanda", q([{"wanda": {"sparsity": 0.5, "report_error": False}}])),
                    ("2:4", "SparseGPT", q([{"sparsegpt": {"pattern": "2:4"}}])),
                    ("2:4", "Wanda", q([{"wanda": {"pattern": "2:4", "report_error": False}}]))]
    return out


# --------------------------------------------------------------------------- llm-compressor

def llmc_run(recipe_fn):
    """``run(model, calib)`` for llm-compressor's ``oneshot`` on the same windows, one per batch, in the same
    order as nnsqueeze sees them (its fake-quantized / masked model is evaluated as it is).

    The windows go in as a ``DataLoader`` (which ``oneshot`` uses as given): from a ``Dataset`` it would draw
    them through a ``RandomSampler`` on torch's global generator, in an order that depends on whatever ran
    before in the process, and its static activation observer (a moving average of each batch's min/max,
    dominated by the first batch) makes the W8A8 perplexity depend on that order (59.5-62.8 over five
    orders on SmolLM2-135M, BENCHMARKS.md)."""
    def run(model, calib):
        from llmcompressor import oneshot
        from torch.utils.data import DataLoader

        model = copy.deepcopy(model)
        rows = torch.cat(calib)
        batches = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]
        t0 = time.perf_counter()
        oneshot(model=model, dataset=DataLoader(batches, batch_size=1, shuffle=False), recipe=recipe_fn(),
                max_seq_length=rows.shape[1], num_calibration_samples=rows.shape[0])
        return model.eval(), time.perf_counter() - t0
    return run


def llmc_methods(n: int) -> list[tuple[str, str, object]]:
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations (pin_memory), which raises "Cannot access
        # accelerator device" on a CPU-only machine. Pinning only speeds up host-to-device copies:
        # skipping it leaves the results unchanged.
        IntermediatesCache.pin_memory = lambda self, *a, **k: None

    def groups(bits, g):
        return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                              "strategy": "group", "group_size": g}}}
    w8a8 = {"group_0": {"targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor",
                                              "dynamic": False}}}
    ig = ["lm_head"]
    out: list[tuple[str, str, object]] = [("fp32", "fp32", None)]
    for bits, g in GRIDS:
        cg, wl = groups(bits, g), f"W{bits} g{g}"
        rtn = lambda cg=cg: QuantizationModifier(config_groups=cg, ignore=ig)  # noqa: E731
        gptq = lambda cg=cg: GPTQModifier(config_groups=cg, ignore=ig, actorder="static")  # noqa: E731
        out += [(wl, "RTN", llmc_run(rtn)),
                (wl, "GPTQ (act order)", llmc_run(gptq)),
                (wl, "AWQ", llmc_run(lambda rtn=rtn: [AWQModifier(), rtn()])),
                (wl, "AWQ+GPTQ", llmc_run(lambda gptq=gptq: [AWQModifier(), gptq()]))]
        if (bits, g) == (4, 64):
            out += [("W8A8", "SmoothQuant a=0.5", llmc_run(lambda: [SmoothQuantModifier(smoothing_strength=0.5),
                                                                     QuantizationModifier(config_groups=w8a8,
                                                                                          ignore=ig)]))]
            for scheme, kw in (("50% unstructured", {"sparsity": 0.5, "mask_structure": "0:0"}),
                               ("2:4", {"sparsity": 0.5, "mask_structure": "2:4"})):
                out += [(scheme, "SparseGPT", llmc_run(lambda kw=kw: SparseGPTModifier(**kw, targets=["Linear"],
                                                                                        ignore=ig))),
                        (scheme, "Wanda", llmc_run(lambda kw=kw: WandaPruningModifier(**kw, targets=["Linear"],
                                                                                      ignore=ig)))]
    return out


# --------------------------------------------------------------------------- run one tool / merge

def run_tool(a) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    # One converted directory for both tools (--model-dir): each venv's own conversion can differ. The
    # separator is the config's eos_token_id: transformers 5.17 (llm-compressor's pin) reads the GGUF-converted
    # tokenizer's eos as <|im_start|> (1), 5.25 as <|im_end|> (2, the config's), which changed the windows.
    model_dir = Path(a.model_dir) if a.model_dir else smollm2.model_dir()
    model, tok = load_model(model_dir, task="causal-lm")
    calib_t = calibration(tok, a.calib, seed=a.calib_seed, eos=model.config.eos_token_id)
    if a.calib_order != "stream":  # the same windows in another order (order-sensitive observers, e.g. ema-minmax)
        order = [int(i) for i in a.calib_order.split(",")]
        if sorted(order) != list(range(a.calib)):
            raise SystemExit(f"--calib-order must be a permutation of 0..{a.calib - 1}, got {a.calib_order}")
        calib_t = calib_t[order]
    calib = list(calib_t.split(8))
    val = eval_tokens(tok)
    val_used = val[: a.eval_windows * SEQ_LEN]
    meta = {"tool": a.tool, "date": str(date.today()), "cpu": cpu_model(), "threads": a.threads,
            "model_dir": str(model_dir), "calib_windows": a.calib, "calib_seed": a.calib_seed,
            "calib_order": a.calib_order, "seq_len": SEQ_LEN, "calib_sha": sha(calib_t),
            "eval_files": list(EVAL_FILES), "eval_text_tokens": val.numel(), "eval_windows": a.eval_windows,
            "eval_sha": sha(val_used), "torch": torch.__version__}
    if a.tool == "llmcompressor":
        import llmcompressor
        meta["llmcompressor"] = llmcompressor.__version__
    print(json.dumps(meta), flush=True)
    rows, fp32 = [], None
    for scheme, name, fn in (nnsqueeze_methods if a.tool == "nnsqueeze" else llmc_methods)(a.calib):
        if a.only and name != "fp32" and not any(o in (name, scheme) for o in a.only):
            continue
        if a.schemes and name != "fp32" and scheme not in a.schemes:
            continue
        row = {"tool": a.tool, "scheme": scheme, "method": name}
        try:
            m, secs = (model, 0.0) if fn is None else fn(model, calib)
            r = perplexity(m, val_used, seq_len=SEQ_LEN, max_windows=a.eval_windows)
            fp32 = r.ppl if fn is None else fp32
            row.update(ppl=r.ppl, vs_fp32=100 * (r.ppl / fp32 - 1), seconds=secs, scored_tokens=r.scored_tokens)
            del m
        except Exception as e:  # a tool refusing a setting is a result to report, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(a.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))  # partial results survive


def merge(paths: list[str], out_dir: Path) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]  # same data and settings, or refuse
    for k in ("calib_sha", "eval_sha", "threads", "calib_windows", "eval_windows"):  # calib_sha covers the seed
        if len({r[k] for r in runs}) != 1:
            raise SystemExit(f"runs differ in {k}: {[r[k] for r in runs]}")
    # A later file's row replaces an earlier one of the same tool, scheme and method (a re-run).
    by_key = {(row["tool"], row["scheme"], row["method"]): row for r in runs for row in r["rows"]}
    rows = list(by_key.values())
    tools = list(dict.fromkeys(r["tool"] for r in runs))
    rows.sort(key=lambda x: (ORDER.index(x["scheme"]), METHODS.index(x["method"]), tools.index(x["tool"])))
    m = runs[0]
    print(f"# SmolLM2-135M-Instruct fp32  {m['date']}  CPU: {m['cpu']}  threads: {m['threads']}  calib: "
          f"{m['calib_windows']} x {SEQ_LEN} tokens of stdlib docstrings  eval: {m['eval_windows']} x {SEQ_LEN}-token "
          f"windows of stdlib comments ({m['eval_windows'] * (SEQ_LEN - 1)} scored of {m['eval_text_tokens']} "
          "tokens)\n")
    print("| scheme | method | tool | perplexity | vs fp32 | calib s |\n|---|---|---|---|---|---|")
    for x in rows:
        if "error" in x:
            print(f"| {x['scheme']} | {x['method']} | {x['tool']} | refused | | `{x['error'][:60]}...` |")
        else:
            print(f"| {x['scheme']} | {x['method']} | {x['tool']} | {x['ppl']:.2f} | {x['vs_fp32']:+.1f}% "
                  f"| {x['seconds']:.1f} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"smollm2-{m['date']}.json"
    path.write_text(json.dumps({"runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
                                "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", choices=["nnsqueeze", "llmcompressor"], default="nnsqueeze")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 256 tokens")
    ap.add_argument("--eval-windows", type=int, default=32, help="256-token windows of the comment text scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", default=None, help="the SmolLM2 Hugging Face directory (default: the zoo's "
                    "cached conversion in this environment); give both tools the same one")
    ap.add_argument("--calib-seed", type=int, default=0, help="which windows are drawn (both tools: the same ones)")
    ap.add_argument("--calib-order", default="stream", help="'stream' (drawn windows in stream order) or a "
                    "comma-separated permutation of 0..calib-1: the order both tools see the windows in")
    ap.add_argument("--only", nargs="*", default=None, help="method or scheme names to run (fp32 always runs)")
    ap.add_argument("--schemes", nargs="*", default=None, help="with --only: keep only these schemes (e.g. 'W4 g64')")
    ap.add_argument("--json", default="bench/results/smollm2-partial.json", help="this tool's rows")
    ap.add_argument("--merge", nargs="+", default=None, help="per-tool JSON files: print the table, write results")
    a = ap.parse_args()
    if a.merge:
        merge(a.merge, Path(__file__).resolve().parent / "results")
    else:
        run_tool(a)


if __name__ == "__main__":
    main()
