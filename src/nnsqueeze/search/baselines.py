"""The fp32 model's figures, measured once per search and shared by every worker through ``DIR``.

``nsq.compress(..., baselines=m)`` looks the baseline (metric, ONNX bytes, latencies, and the ONNX
file itself) up in the mapping ``m`` under a key of the evaluation settings, and stores it there
when it measures it. Within one process a dict does; :class:`SharedBaselines` keeps the mapping in
``DIR/baselines/`` instead, so the second worker of a search, and a resumed search, reuse the
figures the first one measured rather than timing the same fp32 model again, each time beside
other work. One JSON file (the figures) and one ONNX file per key; both are written atomically,
the JSON last, so a half-written entry is never read.

    >>> import tempfile
    >>> from nnsqueeze.search.baselines import SharedBaselines
    >>> with tempfile.TemporaryDirectory() as d:
    ...     SharedBaselines(d)["k"] = ({"accuracy": 0.9}, None, b"onnx")
    ...     SharedBaselines(d)["k"]         # another worker, another process
    ({'accuracy': 0.9}, None, b'onnx')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Iterator

from ..safeio import write_file


class SharedBaselines(MutableMapping):
    """``key -> (figures, export info, ONNX bytes or None)`` kept as files in one directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        h = hashlib.sha256(key.encode()).hexdigest()[:24]
        return self.root / f"{h}.json", self.root / f"{h}.onnx"

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._paths(key)[0].is_file()

    def __getitem__(self, key: str) -> tuple[dict, Any, bytes | None]:
        meta, onnx = self._paths(key)
        try:
            entry = json.loads(meta.read_text())
        except (OSError, ValueError):
            raise KeyError(key) from None
        if entry.get("key") != key:  # a hash collision would be a different model's figures
            raise KeyError(key)
        return entry["figures"], entry["export"], onnx.read_bytes() if entry["onnx"] else None

    def __setitem__(self, key: str, value: tuple[dict, Any, bytes | None]) -> None:
        figures, export, onnx_bytes = value
        meta, onnx = self._paths(key)
        if onnx_bytes is not None:
            write_file(onnx, onnx_bytes, "search baselines")
        entry = {"key": key, "figures": figures, "export": export, "onnx": onnx_bytes is not None}
        write_file(meta, json.dumps(entry, default=str).encode(), "search baselines")

    def __delitem__(self, key: str) -> None:
        for p in self._paths(key):
            p.unlink(missing_ok=True)

    def _keys(self) -> list[str]:
        keys = []
        for p in sorted(self.root.glob("*.json")):
            try:
                keys.append(json.loads(p.read_text())["key"])
            except (OSError, ValueError, KeyError):
                continue
        return keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())
