"""The one reader for every safetensors file nnsqueeze opens (artifacts, ``--weights``, plots).

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw data. A hostile file can lie in each part, so everything
is checked before any tensor is allocated: a regular file (links resolved: no ``/dev/zero``, FIFO or
directory) within :data:`~nnsqueeze.limits.MAX_WEIGHTS_BYTES`; a header length within the file and
:data:`~nnsqueeze.limits.MAX_HEADER_BYTES`; a JSON header nested at most two levels; known dtypes;
non-negative shapes; data offsets inside the file, equal to ``numel * itemsize``, not overlapping.
Only then is the data read, tensor by tensor, so memory never exceeds what the file really holds.
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from typing import Any

import torch

from .errors import NnsqueezeError
from .limits import MAX_HEADER_BYTES, MAX_WEIGHTS_BYTES, loads_json, open_regular, quote

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):  # newer torch only
        DTYPES[_name] = getattr(torch, _attr)


def _entries(header: Any, data_len: int, where: str,
             error: type[NnsqueezeError]) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, begin, end) of each tensor, every field checked; ``end`` relative to the data."""
    if not isinstance(header, dict):
        raise error(where, f"header is a {type(header).__name__}, not a mapping", fix="re-create the file")
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise error(where, "__metadata__ must map strings to strings", fix="re-create the file")
            continue
        at = f"{where}: tensor {quote(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise error(at, "entry must have exactly dtype, shape and data_offsets", fix="re-create the file")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise error(at, f"unknown dtype {quote(dtype)}", fix=f"known dtypes: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise error(at, f"shape must be a list of non-negative integers, got {quote(shape)}",
                        fix="re-create the file")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise error(at, f"data_offsets {quote(offsets)} lie outside the {data_len:,} data bytes of the file",
                        fix="the file is truncated or its header lies; re-create it")
        size = math.prod(shape) * DTYPES[dtype].itemsize
        if size != offsets[1] - offsets[0]:
            raise error(at, f"shape {quote(shape)} of {dtype} needs {size:,} bytes, data_offsets give "
                        f"{offsets[1] - offsets[0]:,}", fix="the header lies; re-create the file")
        out.append((name, DTYPES[dtype], shape, offsets[0], offsets[1]))
    spans = sorted((b, e, n) for n, _, _, b, e in out if e > b)
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise error(f"{where}: tensor {quote(n1)}", f"data overlaps tensor {quote(n0)}", fix="re-create the file")
    return out


def read_safetensors(path: str | os.PathLike, error: type[NnsqueezeError], what: str = "weights file",
                     max_bytes: int = MAX_WEIGHTS_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``; any problem is an ``error`` naming it."""
    where = str(path)
    with open_regular(path, max_bytes, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise error(where, f"corrupt {what}: {size} bytes, shorter than the 8-byte header length",
                        fix="re-create the file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise error(where, f"corrupt {what}: header length {n:,} exceeds the file ({size:,} bytes) or the "
                        f"{MAX_HEADER_BYTES:,}-byte header limit", fix="the file is truncated or not safetensors")
        raw = f.read(n)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise error(where, f"corrupt {what}: header is not UTF-8 JSON", fix="re-create the file") from None
        header = loads_json(text, where, f"{what} header", error)
        data_len = size - 8 - n
        tensors = _entries(header, data_len, where, error)
        out = {}
        for name, dtype, shape, begin, end in tensors:
            f.seek(8 + n + begin)
            t = torch.empty(shape, dtype=dtype)
            if end > begin:
                view = memoryview(t.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != end - begin:  # the file shrank under us
                    raise error(where, f"tensor {quote(name)}: file ended early", fix="re-create the file")
                if dtype is torch.bool and bool((t.view(torch.uint8) > 1).any()):
                    raise error(where, f"tensor {quote(name)}: BOOL bytes other than 0 or 1", fix="re-create the file")
            out[name] = t
    return out



def with_versions(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` as an ordered state dict carrying ``model``'s per-module ``_version`` metadata.

    ``torch.save`` keeps a state dict's ``_metadata`` (each module's ``_version``), safetensors does not.
    Most modules load without it, but some refuse: torchvision's MNASNet raises "version should be set to
    1 or 2 instead of None". A file nnsqueeze reads was written from the same architecture the caller
    built, so the versions of ``model`` (its own ``state_dict()``'s) are the ones to load with; a dict that
    already has ``_metadata`` is returned unchanged.
    """
    if getattr(sd, "_metadata", None) is not None:
        return sd
    out: Any = OrderedDict(sd)
    out._metadata = getattr(model.state_dict(), "_metadata", None)
    return out
