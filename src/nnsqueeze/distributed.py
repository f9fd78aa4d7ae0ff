"""Data-parallel helpers: the same training code runs single-process or under ``torchrun``.

Nothing here is a transport: the process group is torch's own (``gloo`` on CPU, ``nccl`` on CUDA),
set up from the environment variables ``torchrun`` exports (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Without them every helper is a no-op::

    # train.py, launched as:  torchrun --nproc-per-node=2 train.py
    from nnsqueeze import distributed as dist_
    device = dist_.init(torch.device("cpu"))      # joins the group; cuda -> cuda:LOCAL_RANK
    ddp = dist_.wrap(model, device)               # DistributedDataParallel, or model itself
    for batch in dist_.Shard(train_batches):      # every world_size-th batch, equal count per rank
        ...
    model = dist_.unwrap(ddp)
    if dist_.is_main(): print("only rank 0 talks")

The group is left initialised after training: later steps and the caller may still use it. A group that
:func:`init` created is destroyed when the process exits (``atexit``), as torch asks: without it, gloo's
threads can still be running while the interpreter tears down, and a rank then aborts at exit
("terminate called without an active exception", seen once in CI after a run that had succeeded).
``batch_moments`` gives layers that compute BatchNorm statistics themselves (QAT's BN folding) the
statistics of all ranks' batches; ``broadcast_buffers`` makes every rank's buffers rank 0's.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import DataError


def launched() -> bool:
    """True when started by ``torchrun`` (or an equivalent launcher) with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when training should be data-parallel (launched with >1 process or a group of >1 exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return launched()


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or single process): the one that logs, shows progress and writes files."""
    return rank() == 0


def init(device: torch.device | str = "cpu") -> torch.device:
    """Join the process group when launched by ``torchrun``; return the device this rank trains on.

    ``gloo`` for CPU, ``nccl`` for CUDA (each rank takes ``cuda:LOCAL_RANK``). Idempotent; a no-op
    in a single process.
    """
    device = torch.device(device)
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    """Destroy the process group :func:`init` created, if the caller has not already (at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    DDP broadcasts rank 0's parameters and buffers on construction, so all ranks start equal,
    and averages gradients during ``backward()``.
    """
    if not is_distributed():
        return model
    if not dist.is_initialized():
        init(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (the same object that was wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean(value: float, device: torch.device | str = "cpu") -> float:
    """Mean of a Python float over all ranks (the value itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of each rank's input is the sum over ranks of
    the gradients of the (identical) outputs."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g)
        return g


def synced() -> bool:
    """True inside a process group of more than one rank (collectives would actually communicate)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def batch_moments(y: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of ``y`` over ``dims``, and the count behind them.

    In one process: ``y.mean(dims)``, ``y.var(dims, unbiased=False)``. Under a process group of
    more than one rank, while gradients are enabled (training), the moments are those of all
    ranks' batches together (SyncBatchNorm semantics): one differentiable float64 all-reduce of the
    per-rank sums, whose backward sums the gradients over ranks, so that data-parallel training
    equals one process training on the union of the ranks' batches. Every rank must call it the
    same number of times (it is a collective).
    """
    if not (synced() and torch.is_grad_enabled()):
        return y.mean(dims), y.var(dims, unbiased=False), y.numel() // y.shape[1]
    y64 = y.double()
    count = torch.full((1,), float(y.numel() // y.shape[1]), dtype=torch.float64, device=y.device)
    total = _AllReduceSum.apply(torch.cat([y64.sum(dims), (y64 * y64).sum(dims), count]))   # (2C + 1,)
    c, n = y.shape[1], float(total[-1].detach())
    mean = total[:c] / n
    var = (total[c:2 * c] / n - mean * mean).clamp(min=0.0)
    return mean.to(y.dtype), var.to(y.dtype), int(n)


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics, quantization scales...) to every rank.

    DDP does this at the start of every forward; after the last forward each rank's own updates
    (e.g. BatchNorm running statistics from its own batch) would otherwise make the ranks differ.
    A no-op in one process."""
    if not synced():
        return
    for b in model.buffers():
        dist.broadcast(b, src)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def count_batches(data: Iterable) -> int:
    """Number of batches in ``data``: ``len()`` when defined, else one counting pass."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in data)


class Shard:
    """This rank's batches: batch ``i`` goes to rank ``i % world_size``.

    Every rank gets the same number of batches, ``n // world_size``; the trailing ``n % world_size``
    batches are dropped, because DDP needs every rank to run the same number of steps (a rank with
    one step more would wait forever in its gradient all-reduce). Re-iterable if ``data`` is.
    """

    def __init__(self, data: Iterable, rank_: int | None = None, world: int | None = None,
                 where: str = "train_data"):
        self.data = data
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        n = count_batches(data)
        self.length = n // self.world
        if self.length == 0:
            raise DataError(where, f"{n} batch(es) cannot be shared by {self.world} processes",
                            fix=f"give at least {self.world} batches or use fewer processes")

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        stop = self.length * self.world
        for i, batch in enumerate(self.data):
            if i >= stop:
                break
            if i % self.world == self.rank:
                yield batch
