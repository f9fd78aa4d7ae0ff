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

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import ArtifactError, ModelError
from .recipe import FORMAT_VERSION
from .registry import STEPS

log = logging.getLogger("nnsqueeze")

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
    if not mpath.is_file():
        raise ArtifactError(str(path), f"missing {MANIFEST}; not an nnsqueeze artifact",
                            fix="pass a directory written by result.save() or `nnsqueeze compress`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(str(mpath), f"corrupt manifest: {e}", fix="re-create the artifact") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
        raise ArtifactError(str(mpath), "manifest has no integer format_version", fix="re-create the artifact")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ArtifactError(str(mpath), f"format version {manifest['format_version']} is newer than this "
                            f"nnsqueeze reads ({FORMAT_VERSION})", fix="upgrade nnsqueeze")
    return manifest


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Restore a compressed model from an artifact onto ``model``, a fresh fp32 instance."""
    path = Path(path)
    manifest = read_manifest(path)
    if not isinstance(model, nn.Module):
        raise ModelError("model", f"expected a fresh torch.nn.Module, got {type(model).__name__}",
                         fix="pass model=YourModel() built the same way as the compressed one")
    for i, entry in enumerate(manifest.get("steps", [])):
        try:
            step_cls = STEPS.get(entry["name"], where=f"{MANIFEST}: steps[{i}]")
            config = step_cls.Config.model_validate(entry["config"])
            model = step_cls.rebuild(model, config, entry.get("record", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path / MANIFEST}: steps[{i}]", f"cannot replay step: {e}",
                                fix="check that the model factory matches the one that was compressed") from None
    try:
        sd = st_load((path / WEIGHTS).read_bytes())
    except FileNotFoundError:
        raise ArtifactError(str(path), f"missing {WEIGHTS}", fix="re-create the artifact") from None
    except SafetensorError as e:
        raise ArtifactError(str(path / WEIGHTS), f"corrupt weights file: {e}", fix="re-create the artifact") from None
    sd = unpack_state(model, sd)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ArtifactError(str(path / WEIGHTS), f"weights do not fit the model: {str(e)[:400]}",
                            fix="pass a fresh instance of the same architecture that was compressed") from None
    check_isa(manifest, str(path))
    return model.eval()


def check_isa(manifest: dict[str, Any], where: str) -> bool:
    """Warn when the artifact was quantized for another integer kernel class than this CPU's
    (u8s8 saturating or not, see :mod:`nnsqueeze.isa`). Returns True when it warned."""
    from .isa import describe

    then = manifest.get("isa")
    if not isinstance(then, dict) or not isinstance(then.get("u8s8_saturates"), bool):
        return False  # older artifacts did not record it
    now = describe()
    if then["u8s8_saturates"] == now["u8s8_saturates"]:
        return False
    if now["u8s8_saturates"]:
        log.warning("%s was quantized on a CPU whose ONNX Runtime u8s8 kernels are exact (%s); this CPU (%s) "
                    "saturates int16 sums with 8-bit weight codes, so the ONNX Runtime parity measured at "
                    "compression time no longer holds here: re-quantize on this machine, or quantize with "
                    "weights.reduce_range: true (7-bit codes, exact on every CPU) to be portable",
                    where, then.get("isa"), now["isa"])
    else:
        log.warning("%s was quantized on a CPU whose ONNX Runtime u8s8 kernels saturate (%s): its 7-bit weight "
                    "codes (reduce_range auto) still run exactly on this CPU (%s), but re-quantizing here "
                    "gives full 8-bit codes", where, then.get("isa"), now["isa"])
    return True
