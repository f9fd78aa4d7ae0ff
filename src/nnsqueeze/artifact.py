"""Artifact directories: written atomically, reloaded without pickle.

Layout of ``result.save("out/")``::

    out/model.safetensors   weights, masks, quantization parameters (int8 weights packed)
    out/nnsqueeze.json      format version, resolved recipe, per-step records, per-layer scheme
    out/recipe.yaml         the resolved recipe
    out/report.json         baseline vs compressed figures
    out/report.md           the same in Markdown
    out/model.onnx          the deployable model (when export is on)

``load("out/", model=fresh_fp32_model)`` replays each step's structural changes on the fresh model
(no data needed), then loads the tensors. Nothing is unpickled; loading never executes code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from .errors import ArtifactError, ModelError, NnsqueezeError
from .limits import quote, read_json
from .recipe import FORMAT_VERSION
from .registry import STEPS

MANIFEST = "nnsqueeze.json"
WEIGHTS = "model.safetensors"


def pack_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with compact storage where modules provide it (``pack_state``)."""
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if hasattr(mod, "pack_state"):
            mod.pack_state(sd, f"{name}." if name else "")
    return sd


def unpack_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, mod in model.named_modules():
        if hasattr(mod, "unpack_state"):
            mod.unpack_state(sd, f"{name}." if name else "")
    return sd


def weights_bytes(model: nn.Module) -> bytes:
    return st_save(pack_state(model))


def write_dir(out: str | os.PathLike, files: dict[str, bytes | str], marker: str = MANIFEST) -> Path:
    """Write ``files`` into ``out`` atomically: a temporary sibling directory, then a rename.

    A directory at ``out`` holding ``marker`` (one we wrote) is replaced; any other non-empty
    directory is refused.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(str(out), "exists and is not a directory", fix="choose another --out path")
        if any(out.iterdir()) and not (out / marker).exists():
            raise ArtifactError(str(out), "is a non-empty directory that is not an nnsqueeze artifact",
                                fix="choose a new or empty output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(str(path), "artifact directory not found", fix="pass the --out directory of a run")
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):  # anything else there (a link to a device, a FIFO) read_json refuses
        raise ArtifactError(str(path), f"missing {MANIFEST}; not an nnsqueeze artifact",
                            fix="pass a directory written by result.save() or `nnsqueeze compress`")
    manifest = read_json(mpath, "manifest", ArtifactError)
    if not isinstance(manifest, dict) or type(manifest.get("format_version")) is not int:
        raise ArtifactError(str(mpath), "manifest has no integer format_version", fix="re-create the artifact")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ArtifactError(str(mpath), f"format version {manifest['format_version']} is newer than this "
                            f"nnsqueeze reads ({FORMAT_VERSION})", fix="upgrade nnsqueeze")
    _check_steps(manifest.get("steps", []), str(mpath))
    return manifest


def _check_steps(steps: Any, where: str) -> None:
    """The manifest's step list has the shape ``load`` replays: ``[{name, config, record?}, ...]``."""
    if not isinstance(steps, list):
        raise ArtifactError(f"{where}: steps", f"must be a list, got {type(steps).__name__}", fix="re-create the artifact")
    for i, entry in enumerate(steps):
        at = f"{where}: steps[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ArtifactError(at, f"must be a mapping with a string 'name', got {quote(entry)}",
                                fix="re-create the artifact")
        for key in ("config", "record"):
            if key in entry and not isinstance(entry[key], dict):
                raise ArtifactError(f"{at}.{key}", f"must be a mapping, got {quote(entry[key])}",
                                    fix="re-create the artifact")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an artifact's ``model.safetensors``, every header field checked before reading."""
    from .safe_weights import read_safetensors

    return read_safetensors(Path(path) / WEIGHTS, ArtifactError, what=f"weights file {WEIGHTS}")


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Restore a compressed model from an artifact onto ``model``, a fresh fp32 instance."""
    path = Path(path)
    manifest = read_manifest(path)
    if not isinstance(model, nn.Module):
        raise ModelError("model", f"expected a fresh torch.nn.Module, got {type(model).__name__}",
                         fix="pass model=YourModel() built the same way as the compressed one")
    fix = "pass a fresh instance of the same architecture (same widths) that was compressed"
    for i, entry in enumerate(manifest.get("steps", [])):
        where = f"{path / MANIFEST}: steps[{i}] ({quote(entry['name'], 60)})"
        try:
            step_cls = STEPS.get(entry["name"], where=where)
            config = step_cls.Config.model_validate(entry.get("config", {}))
            model = step_cls.rebuild(model, config, entry.get("record", {}))
        except NnsqueezeError as e:  # a recorded layer missing from this model, a rank too large for it
            raise ArtifactError(f"{where}: {e.where}", e.problem, fix=e.fix or fix) from None
        # A crafted or mismatched record must not escape untyped: whatever the replay trips over
        # (missing module, index out of range, a shape torch refuses) is a bad artifact for this model.
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as e:
            raise ArtifactError(where, f"cannot replay step: {type(e).__name__}: {quote(str(e))}", fix=fix) from None
    sd = read_weights(path)
    try:
        sd = unpack_state(model, sd)
        model.load_state_dict(sd, strict=True)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise ArtifactError(str(path / WEIGHTS), f"weights do not fit the model: {quote(str(e), 400)}",
                            fix=fix) from None
    return model.eval()
