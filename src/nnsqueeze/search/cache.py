"""Work shared between trials: a content-keyed cache of models part-way through a recipe.

Trials whose recipes begin with the same steps (same configs) on the same model, data and seed
reach the same intermediate model, so 20 quantization variants of one pruned model cost one
pruning. After each step of a trial the model is stored under ``DIR/cache/<key>/`` as an
nnsqueeze artifact (``nnsqueeze.json`` with the step records, ``model.safetensors``; never
pickle), plus the torch RNG state and the report entries of those steps; a later trial starts
from the longest stored prefix of its recipe (:class:`nnsqueeze.pipeline.Checkpoint`).

key = sha256(model weights, data, seed, the prefix's resolved step configs)

A point where a step left training callbacks for a later one (gradual pruning before
fine-tuning) is not stored: those callbacks exist only inside the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .. import artifact
from ..errors import ArtifactError, NnsqueezeError
from ..pipeline import Checkpoint
from ..recipe import FORMAT_VERSION, Recipe
from ..safeio import write_dir

log = logging.getLogger("nnsqueeze")
PART, RNG = "part.json", "rng.safetensors"


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    else:
        h.update(repr(obj).encode())


def data_key(*datas: Iterable | None) -> str:
    """A content hash of the data sets (every tensor's dtype, shape and bytes)."""
    h = hashlib.sha256()
    for d in datas:
        h.update(b"|")
        if d is not None:
            for batch in d:
                _feed(h, batch)
    return h.hexdigest()


def model_key(model: nn.Module) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in model.state_dict().items()})
    return h.hexdigest()


class PrefixCache:
    """Intermediate models in ``root``, keyed by content; counts hits and stores."""

    def __init__(self, root: str | Path, model: nn.Module, data: str, enabled: bool = True):
        self.root, self.model, self.enabled = Path(root), model, enabled
        self.base = {"model": model_key(model), "data": data}
        self.hits = self.stores = 0

    def key(self, recipe: Recipe, done: int) -> str:
        steps = [{e.name: e.config.model_dump(mode="json")} for e in recipe.steps[:done]]
        text = json.dumps({**self.base, "seed": recipe.seed, "steps": steps}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def lookup(self, recipe: Recipe) -> Checkpoint | None:
        """The longest stored prefix of ``recipe`` (never the whole recipe), or None."""
        if not self.enabled:
            return None
        for done in range(len(recipe.steps) - 1, 0, -1):
            path = self.root / self.key(recipe, done)
            if not (path / artifact.MANIFEST).is_file():
                continue
            try:
                cp = self._read(path, done)
            except (NnsqueezeError, OSError, ValueError, KeyError) as e:  # a damaged entry: recompute it
                log.warning("search cache: ignoring %s (%s)", path, e)
                continue
            self.hits += 1
            return cp
        return None

    def _read(self, path: Path, done: int) -> Checkpoint:
        model = artifact.load(path, copy.deepcopy(self.model))
        records = artifact.read_manifest(path)["steps"]
        part = json.loads((path / PART).read_text())
        rng = st_load((path / RNG).read_bytes())["rng"]
        return Checkpoint(model, done, records, part, rng)

    def store(self, recipe: Recipe, cp: Checkpoint) -> None:
        """Keep ``cp`` unless it is the whole recipe, holds pending callbacks, or is stored already."""
        if not self.enabled or cp.pending or cp.done >= len(recipe.steps):
            return
        path = self.root / self.key(recipe, cp.done)
        if (path / artifact.MANIFEST).is_file():
            return
        manifest = {"format_version": FORMAT_VERSION, "steps": cp.records, "layers": cp.report.get("layers", {}),
                    "files": {"weights": artifact.WEIGHTS, "onnx": None}}
        files = {artifact.WEIGHTS: artifact.weights_bytes(cp.model), artifact.MANIFEST: json.dumps(manifest),
                 PART: json.dumps(cp.report, default=str), RNG: st_save({"rng": cp.rng})}
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            write_dir(path, files, artifact.MANIFEST)
        except ArtifactError:  # another worker stored the same prefix first: theirs is identical
            return
        self.stores += 1
