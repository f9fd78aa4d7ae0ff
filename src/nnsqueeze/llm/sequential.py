"""Block-by-block calibration of a causal LM: the orchestration around the pure math of this package.

1. :func:`find_blocks` locates the decoder blocks (the ``nn.ModuleList`` at ``model.layers``,
   ``model.model.layers``, ``transformer.h``, ``model.decoder.layers``, ``gpt_neox.layers``, or else
   the largest ModuleList of same-class children that contain Linear layers).
2. :func:`capture_block_inputs` runs the model on the calibration batches with a pre-hook on block 0
   that records its ``(args, kwargs)`` and raises to stop the forward pass: nothing after the
   embeddings runs, and rotary tables / attention masks computed once by the model are captured too.
3. :func:`run_sequential`, for each block: hooks the targeted Linears to feed their inputs to one
   accumulator each (Hessian, norms, ...), runs the block on the stored inputs, lets the caller's
   ``apply`` rewrite each layer, then runs the block **again** so that the next block is calibrated
   on the compressed model's activations (as GPTQ does). Only the current block's inputs and outputs
   are in memory (one hidden-state tensor per batch each).

Within a block every targeted Linear is calibrated from the block's inputs in one pass (not
"true-sequential" sub-layer order). Example (GPTQ on every Linear of the blocks, ``lm_head`` left)::

    >>> import torch
    >>> from nnsqueeze.llm.tiny import TinyLlama
    >>> from nnsqueeze.llm.gptq import HessianAccumulator, gptq_quantize
    >>> from nnsqueeze.llm.sequential import run_sequential, block_linears, get_weight, set_weight
    >>> model = TinyLlama(); batches = [torch.randint(0, 97, (2, 16)) for _ in range(2)]
    >>> names = block_linears(model)
    >>> def apply(name, mod, acc):
    ...     set_weight(mod, gptq_quantize(get_weight(mod), acc.hessian, group_size=32).weight)
    ...     return {}
    >>> rep = run_sequential(model, batches, names, lambda n, m: HessianAccumulator(get_weight(m).shape[1]), apply)
    >>> rep.blocks, len(rep.layers)
    (2, 14)
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..data import call_model, split, to_device
from ..errors import DataError, ModelError
from .offload import DiskBlocks, tensor_bytes

Tensor = torch.Tensor

KNOWN_PATHS = ("model.layers", "model.model.layers", "transformer.h", "model.decoder.layers",
               "model.model.decoder.layers", "gpt_neox.layers", "layers", "transformer.blocks")


# ---- weights of Linear-like layers ---------------------------------------------------------------

def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2: a Linear with its weight stored (in, out))."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D"
                                             and isinstance(getattr(module, "weight", None), Tensor)
                                             and getattr(module.weight, "dim", lambda: 0)() == 2)


def get_weight(module: nn.Module) -> Tensor:
    """The weight as ``(out, in)`` (a detached float32 copy; packed layers: their dequantized weight)."""
    if not module.weight.is_floating_point() and hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().to(torch.float32)
    w = module.weight.detach()
    return (w.T if type(module).__name__ == "Conv1D" else w).to(torch.float32).clone()


@torch.no_grad()
def set_weight(module: nn.Module, w: Tensor) -> None:
    """Write an ``(out, in)`` weight back in the module's own layout and dtype."""
    w = w.T if type(module).__name__ == "Conv1D" else w
    module.weight.copy_(w.to(module.weight.dtype))


# ---- blocks ----------------------------------------------------------------------------------------

def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the decoder blocks. Raises :class:`ModelError` when none is found."""
    for path in KNOWN_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1 or not any(is_linear(m) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ModelError(type(model).__name__, "no decoder blocks found (a ModuleList of identical "
                         "blocks containing Linear layers)",
                         fix=f"supported layouts: {', '.join(KNOWN_PATHS)}")
    return best[1], best[2]


def block_linears(model: nn.Module) -> list[str]:
    """Names of every Linear-like module inside the decoder blocks (the default targets)."""
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules() if is_linear(m)]


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


@contextmanager
def _no_cache(model: nn.Module):
    """Hugging Face models build a KV cache by default; replaying a block must not grow one."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "use_cache", None)
    if old is not None:
        cfg.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            cfg.use_cache = old


def _inputs_of(batch: Any) -> Any:
    inputs, _ = split(batch)
    if isinstance(inputs, dict):  # labels would only make the (stopped) forward compute a loss
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
    return inputs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable,
                         device: torch.device | str = "cpu") -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` that ``blocks[0]`` receives for every calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _no_cache(model):
            for batch in batches:
                try:
                    call_model(model, to_device(_inputs_of(batch), device))
                except _Stop:
                    pass
                else:
                    raise ModelError("sequential", "the model's forward pass never reached its first decoder block",
                                     fix="check that find_blocks() found the blocks this model runs")
    finally:
        handle.remove()
    if not captured:
        raise DataError("calib_data", "no calibration batches", fix="pass calib_data=... (token id batches)")
    return captured


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def rss_mib() -> tuple[float, float]:
    """``(current, peak)`` resident set size of this process in MiB (peak: since process start)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    try:
        with open("/proc/self/statm") as f:
            cur = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        cur = float("nan")
    return cur, peak


@dataclass
class SequentialReport:
    blocks: int = 0
    batches: int = 0
    tokens: int = 0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)   # per-layer figures from `apply`
    peak_rss_mib: float = 0.0          # process peak RSS after the run (includes loading the model)
    rss_before_mib: float = 0.0
    block_inputs_mib: float = 0.0      # size of one block's stored hidden states
    seconds: float = 0.0
    model_mib: float = 0.0             # parameters + buffers before the run
    offloaded: bool = False            # blocks kept on disk (max_memory below the model size)
    resident_weights_mib: float = 0.0  # with offload: non-block weights + the largest block

    def as_dict(self) -> dict[str, Any]:
        d = {"blocks": self.blocks, "calibration_batches": self.batches, "calibration_tokens": self.tokens,
             "peak_rss_mib": round(self.peak_rss_mib, 1), "rss_before_mib": round(self.rss_before_mib, 1),
             "block_inputs_mib": round(self.block_inputs_mib, 3), "seconds": round(self.seconds, 3),
             "model_mib": round(self.model_mib, 3)}
        if self.offloaded:
            d.update(offloaded_blocks=True, resident_weights_mib=round(self.resident_weights_mib, 3))
        return d


@torch.no_grad()
def run_sequential(model: nn.Module, batches: Iterable, layers: list[str],
                   make_stats: Callable[[str, nn.Module], Any],
                   apply: Callable[[str, nn.Module, Any], dict[str, Any] | None],
                   device: torch.device | str = "cpu", propagate: bool = True,
                   on_block: Callable[[int, nn.Module], None] | None = None,
                   extra_hooks: Callable[[int, nn.Module], list] | None = None,
                   max_memory: int | None = None, offload_dir: str | None = None,
                   on_note: Callable[[str], None] | None = None) -> SequentialReport:
    """Calibrate ``layers`` (full module names, inside the blocks) block by block.

    ``make_stats(name, module)`` returns an accumulator with ``.add(x)`` (x: the layer input,
    (..., in)); ``apply(name, module, stats)`` rewrites the layer and returns per-layer figures.
    ``propagate=True`` feeds each block the outputs of the already compressed blocks before it
    (``False``: the float model's activations, computed before the block is rewritten).
    ``on_block(i, block)``, if given, runs after the block's layers are applied (before propagation);
    ``extra_hooks(i, block)`` may register more hooks for the statistics pass and return their handles.
    ``max_memory`` (bytes): when the model's weights exceed it, every block is parked on disk
    (:class:`~nnsqueeze.llm.offload.DiskBlocks`, memory-mapped safetensors in a temporary directory
    under ``offload_dir``) and only the active block is loaded; results are identical. ``on_note``
    receives a message when even one block plus the non-block weights exceed the budget.
    """
    t0 = time.perf_counter()
    rep = SequentialReport()
    rep.rss_before_mib = rss_mib()[0]
    prefix, blocks = find_blocks(model)
    wanted = set(layers)
    outside = [n for n in layers if not any(n.startswith(f"{prefix}.{i}.") for i in range(len(blocks)))]
    if outside:
        raise ModelError("sequential", f"layers outside the decoder blocks: {outside[:4]}",
                         fix="block-wise calibration only handles layers inside the blocks; ignore them")
    was_training = model.training
    model.eval()
    rep.model_mib = tensor_bytes(model) / 2**20
    store = None
    if max_memory is not None and tensor_bytes(model) > max_memory:
        sizes = [tensor_bytes(b) for b in blocks]
        resident = tensor_bytes(model) - sum(sizes) + max(sizes)
        rep.offloaded, rep.resident_weights_mib = True, resident / 2**20
        if resident > max_memory and on_note is not None:
            on_note(f"max_memory {max_memory / 2**20:.1f} MiB is below the non-block weights plus one block "
                    f"({resident / 2**20:.1f} MiB): blocks go to disk, but the budget cannot be met")
        store = DiskBlocks(blocks, offload_dir)
        store.offload_all()
    inputs = capture_block_inputs(model, blocks, batches, device)
    rep.batches = len(inputs)
    rep.tokens = sum(_hidden(a, k).shape[:-1].numel() for a, k in inputs)
    rep.block_inputs_mib = sum(_hidden(a, k).numel() * _hidden(a, k).element_size() for a, k in inputs) / 2**20
    try:
        for i, block in enumerate(blocks):
            if store is not None:
                store.load(i)
            mine = [(f"{prefix}.{i}.{n}", m) for n, m in block.named_modules() if f"{prefix}.{i}.{n}" in wanted]
            stats = {name: make_stats(name, m) for name, m in mine}
            handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0]))
                       for name, m in mine]
            if extra_hooks is not None:
                handles += list(extra_hooks(i, block))
            try:
                if mine:
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            last = i + 1 == len(blocks)
            nxt = None
            if not propagate and not last:  # float activations: run the block before rewriting it
                nxt = [_with_hidden(a, k, _block_output(block(*a, **k))) for a, k in inputs]
            for name, m in mine:
                rep.layers[name] = dict(apply(name, m, stats.pop(name)) or {})
            if on_block is not None:
                on_block(i, block)
            if propagate and not last:
                nxt = [_with_hidden(a, k, _block_output(block(*a, **k))) for a, k in inputs]
            inputs = nxt  # the previous block's inputs are released here
            if store is not None:
                store.store(i)  # the compressed block goes back to disk (memory-mapped)
            rep.blocks += 1
    finally:
        if store is not None:
            store.close()
        model.train(was_training)
    rep.peak_rss_mib = rss_mib()[1]
    rep.seconds = time.perf_counter() - t0
    return rep
