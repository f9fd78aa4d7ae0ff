"""Decoder blocks kept on disk (memory-mapped safetensors) while a block-wise pass works on one.

With a ``max_memory`` budget smaller than the model, :func:`nnsqueeze.llm.sequential.run_sequential`
writes every decoder block to a safetensors file and re-points the block's parameters and buffers at
a copy-on-write memory map of that file: the block's RAM is freed and its bytes are paged in only
when touched. The active block is loaded into ordinary memory (:meth:`DiskBlocks.load`), compressed,
and written back (:meth:`DiskBlocks.store`), so resident memory is the non-block weights
(embeddings, ``lm_head``), one block, and one block's activations. The files are unlinked right after
mapping (Linux keeps a mapped file alive), so nothing is left behind::

    >>> import torch
    >>> from nnsqueeze.llm.tiny import TinyLlama
    >>> from nnsqueeze.llm.offload import DiskBlocks, parse_bytes
    >>> model = TinyLlama()
    >>> store = DiskBlocks(model.model.layers)
    >>> store.offload_all(); store.on_disk(0)
    True
    >>> store.load(0); store.on_disk(0)
    False
    >>> store.close()                      # removes the (already empty) temporary directory
    >>> parse_bytes("1.5 MiB"), parse_bytes(2048)
    (1572864, 2048)

The reader is a small safetensors parser (8-byte header length, JSON header, raw little-endian
data) over ``mmap`` + ``torch.frombuffer``, because ``safetensors.torch.load_file`` copies every
tensor into memory.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(v: int | str) -> int:
    """``2048``, ``"300MB"``, ``"1.5 GiB"`` -> bytes."""
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {v!r} as a size: use bytes or a number with KB/MB/GB/KiB/MiB/GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def mmap_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file backed by a copy-on-write memory map (nothing read yet)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    if mm is None:
        raise ValueError(f"{path}: empty file")
    (n,) = struct.unpack("<Q", mm[:8])
    header = json.loads(mm[8:8 + n])
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            out[key] = torch.empty(info["shape"], dtype=dtype)
        else:
            out[key] = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start).reshape(info["shape"])
    return out


def _tensors(block: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
    """``(owner, attribute, tensor, is_parameter)`` for every parameter and buffer of ``block``."""
    out = []
    for mod in block.modules():
        out += [(mod, k, p, True) for k, p in mod._parameters.items() if p is not None]
        out += [(mod, k, b, False) for k, b in mod._buffers.items() if b is not None]
    return out


def _rebind(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for i, (mod, key, t, is_param) in enumerate(_tensors(block)):
        new = tensors[str(i)]
        if is_param:
            t.data = new                      # same Parameter object: hooks and references stay valid
        else:
            mod._buffers[key] = new


class DiskBlocks:
    """Decoder blocks parked in memory-mapped safetensors files under ``directory`` (a temp dir)."""

    def __init__(self, blocks: nn.ModuleList, directory: str | os.PathLike | None = None):
        self.blocks = blocks
        self.dir = Path(tempfile.mkdtemp(prefix="nsq-offload-", dir=directory))
        self._disk: set[int] = set()
        self._version = 0

    def offload_all(self) -> None:
        for i in range(len(self.blocks)):
            self.store(i)

    def on_disk(self, i: int) -> bool:
        return i in self._disk

    @torch.no_grad()
    def store(self, i: int) -> None:
        """Write block ``i`` to disk and point it at the memory map (its RAM copy is freed)."""
        block = self.blocks[i]
        state = {str(j): t.detach().contiguous() for j, (_, _, t, _) in enumerate(_tensors(block))}
        self._version += 1
        path = self.dir / f"block{i}-{self._version}.safetensors"
        save_file(state, str(path))
        del state
        _rebind(block, mmap_safetensors(path))
        path.unlink()                          # the mapping keeps the data; no file is left behind
        self._disk.add(i)

    @torch.no_grad()
    def load(self, i: int) -> None:
        """Copy block ``i`` into ordinary memory (it is about to be read and rewritten)."""
        if i not in self._disk:
            return
        block = self.blocks[i]
        _rebind(block, {str(j): t.detach().clone() for j, (_, _, t, _) in enumerate(_tensors(block))})
        self._disk.discard(i)

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass
