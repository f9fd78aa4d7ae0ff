"""Run exported ONNX models in ONNX Runtime as if they were torch modules, and time them.

``OrtModule`` takes torch tensors (positional, or keyword/dict by input name) and returns torch
tensors, so metrics written for the torch model work on the exported one unchanged::

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from nnsqueeze.export.onnx import export_onnx
    >>> from nnsqueeze.export.ort import OrtModule, ort_latency_ms
    >>> model, x = nn.Sequential(nn.Linear(4, 3)).eval(), torch.randn(2, 4)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "m.onnx")
    ...     _ = export_onnx(model, path, x)
    ...     ort_model = OrtModule(path, threads=1)
    ...     ms = ort_latency_ms(path, x, threads=1, warmup=1, runs=3)
    >>> torch.allclose(ort_model(x), model(x), atol=1e-5), ms > 0
    (True, True)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cpu
from ..errors import DataError, ExportError
from ..limits import cap_threads

Tensor = torch.Tensor


def u8s8_may_saturate() -> bool:
    """True where ONNX Runtime's uint8 x int8 kernels may saturate (x86 without VNNI); kept for
    callers of earlier versions: see :func:`nnsqueeze.isa.u8s8_saturates`."""
    from ..isa import u8s8_saturates

    return u8s8_saturates()


def session_options(threads: int | None = None, optimized_model_path: str | None = None,
                    spinning: bool | None = None):
    """CPU session options: ``threads`` intra-op threads (None: ORT's default), sequential execution.
    ``spinning: False`` stops idle worker threads from spinning after each run (ORT spins by default):
    needed when several sessions take turns on few cores, where one session's spinning threads
    steal the next one's cores (measured: -25% throughput interleaving 4 sessions on 2 cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = cap_threads(int(threads))  # a safety net for every caller
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: no warning about serialising hardware-specific graphs
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def make_session(path_or_bytes: str | os.PathLike | bytes, threads: int | None = None,
                 optimized_model_path: str | None = None, spinning: bool | None = None, timed: bool = False):
    """An ORT CPU session. ``timed``: for a latency measurement, which keeps ``threads`` even when
    this process shares the machine with other workers (:mod:`nnsqueeze.cpu`); other sessions there
    compute with the shared thread count and no spinning."""
    import onnxruntime as ort

    if not timed:
        threads, spinning = cpu.compute_threads(threads), cpu.spinning(spinning)

    src = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    try:
        return ort.InferenceSession(src, session_options(threads, optimized_model_path, spinning),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        where = "ONNX bytes" if isinstance(src, (bytes, bytearray)) else src
        raise ExportError(where, f"ONNX Runtime cannot load the model: {e}",
                          fix="re-export with nnsqueeze.export.onnx.export_onnx") from None


def _numpy(t: Any) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().cpu().contiguous().numpy()
    return np.asarray(t)


def _flat_tensors(obj: Any) -> list:
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat_tensors(o)]
    return [obj]


class OrtModule:
    """An ONNX model in an ONNX Runtime CPU session, called like the torch model it came from.

    ``OrtModule(path)(x)`` / ``(x1, x2)`` / ``(input_ids=..., attention_mask=...)``. Returns one
    tensor, or a tuple when the model has several outputs. ``eval()``/``to()`` are no-ops so code
    that prepares a torch model accepts it too.
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, threads: int | None = None,
                 spinning: bool | None = None, timed: bool = False):
        self.session = make_session(path_or_bytes, threads, spinning=spinning, timed=timed)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.training = False

    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """ORT input dict from positional tensors or keyword tensors (a single dict also works)."""
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            kwargs, args = dict(args[0]), ()
        if args and kwargs:
            raise DataError("OrtModule", "mixing positional and keyword inputs",
                            fix="pass either tensors in order or a dict of named tensors")
        if kwargs:
            missing = [n for n in self.input_names if n not in kwargs]
            if missing:
                raise DataError("OrtModule", f"missing inputs {missing} (model inputs: {self.input_names})",
                                fix="pass every model input by name")
            # Inputs the exporter pruned (unused by the graph) are dropped silently.
            return {n: _numpy(kwargs[n]) for n in self.input_names}
        flat = _flat_tensors(list(args))
        if len(flat) != len(self.input_names):
            raise DataError("OrtModule", f"got {len(flat)} inputs, the model takes {len(self.input_names)} "
                            f"({self.input_names})", fix="pass the same inputs as to the torch model")
        return {n: _numpy(t) for n, t in zip(self.input_names, flat)}

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, ...]:
        outs = self.session.run(None, self.feeds(*args, **kwargs))
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    forward = __call__

    def eval(self) -> "OrtModule":
        return self

    def train(self, mode: bool = True) -> "OrtModule":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "OrtModule":
        return self

    def __repr__(self) -> str:
        return f"OrtModule(inputs={self.input_names}, outputs={self.output_names})"


def optimized_op_types(path_or_bytes: str | os.PathLike | bytes, threads: int | None = 1) -> list[str]:
    """Op types of the graph ONNX Runtime actually runs (after its fusions), in graph order."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = os.path.join(d, "optimized.onnx")
        make_session(path_or_bytes, threads, optimized_model_path=opt)
        return [n.op_type for n in onnx.load(opt).graph.node]


def ort_latency_ms(path: str | os.PathLike | bytes, inputs: Any, threads: int | None = None,
                   warmup: int = 5, runs: int = 20, budget_s: float | None = None,
                   with_runs: bool = False) -> float | tuple[float, int]:
    """Median wall time of one ``session.run`` on ``inputs`` (tensor, tuple or dict), in ms; ``(ms, timed
    calls)`` with ``with_runs``. ``budget_s``: see :func:`nnsqueeze.cpu.timed_median`."""
    if runs < 1:
        raise DataError("ort_latency_ms", "runs must be >= 1", fix="use e.g. runs=20")
    # the session is built outside the timing lock: only the runs need the machine to themselves
    m = OrtModule(path if isinstance(path, (bytes, bytearray)) else Path(path), threads=threads, timed=True)
    feeds = m.feeds(**inputs) if isinstance(inputs, dict) else m.feeds(*_flat_tensors([inputs]))
    with cpu.timing():  # workers sharing the machine take turns, the others paused (nnsqueeze.cpu)
        ms, n = cpu.timed_median(lambda: m.session.run(None, feeds), warmup, runs, budget_s)
    m.session = None   # the session's memory goes now, not at the caller's next collection
    return (float(ms), n) if with_runs else float(ms)
