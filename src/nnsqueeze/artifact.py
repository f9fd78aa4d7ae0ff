"""Artifact directories: written safely (see :mod:`nnsqueeze.safeio`), reloaded without pickle.

Layout of ``result.save("out/")``::

    out/model.safetensors   weights, masks, quantization parameters (int8 weights packed)
    out/nnsqueeze.json      format version, resolved recipe, per-step records, per-layer scheme
    out/recipe.yaml         the resolved recipe
    out/report.json         baseline vs compressed figures
    out/report.md           the same in Markdown
    out/model.onnx          the deployable model (when export is on)

``load("out/", model=fresh_fp32_model)`` replays each step's structural changes on the fresh model
(no data needed), then any record a guard appended (the latency guard's ``revert``: layers back to
float), then loads the tensors. Nothing is unpickled; loading never executes code.

A non-empty ``out`` is refused unless ``save(out, overwrite=True)``, which replaces only the files
above (and ``plots/`` when ``nnsqueeze plot`` wrote it) and keeps everything else.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save as st_save
from torch import nn

from .errors import ArtifactError, ModelError, NnsqueezeError
from .limits import quote, read_json
from .recipe import FORMAT_VERSION
from .registry import REPLAYS, STEPS
from .safeio import check_dir_target, marker_ok
from .safeio import write_dir as safe_write_dir

log = logging.getLogger("nnsqueeze")

MANIFEST = "nnsqueeze.json"
WEIGHTS = "model.safetensors"
# Manifest format versions this nnsqueeze reads. 1: step records only (a latency guard edited them
# in place); 2: may also hold records no step wrote (the guard's ``revert``, replayed through
# REPLAYS). A manifest is written as 2 only when it holds such a record, so that older nnsqueeze
# versions refuse it with "newer, upgrade" instead of failing on an unknown step, and read the rest.
MANIFEST_VERSION = 2


def manifest_version(steps: list[dict[str, Any]]) -> int:
    """The format version a manifest with these ``steps`` entries needs (see MANIFEST_VERSION)."""
    return MANIFEST_VERSION if any(e.get("name") in REPLAYS for e in steps) else FORMAT_VERSION


def pack_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with compact storage where modules declare it
    (:class:`~nnsqueeze.quant.protocol.Packable`)."""
    from .quant.protocol import Packable

    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, Packable):
            mod.pack_state(sd, f"{name}." if name else "")
    return sd


def unpack_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from .quant.protocol import Packable

    for name, mod in model.named_modules():
        if isinstance(mod, Packable):
            mod.unpack_state(sd, f"{name}." if name else "")
    return sd


def weights_bytes(model: nn.Module) -> bytes:
    return st_save(pack_state(model))


# Every name an artifact's writers put in it (result.save, the demos, `nnsqueeze plot` for plots/):
# with overwrite, these alone are replaced or removed; anything else in the directory is kept.
ARTIFACT_FILES = frozenset({WEIGHTS, MANIFEST, "recipe.yaml", "report.json", "report.md", "model.onnx",
                            "demo-llm.json"})
PLOTS, PLOTS_INDEX = "plots", "plots.json"


def plot_names(plots: Path) -> list[str] | None:
    """The PNG names ``plots/plots.json`` lists, or None when that folder is not provably ours."""
    if plots.is_symlink() or not plots.is_dir() or not marker_ok(plots / PLOTS_INDEX):
        return None
    names = json.loads((plots / PLOTS_INDEX).read_text())["plots"]
    return [n for n in names if isinstance(n, str) and Path(n).name == n and n.endswith(".png")]


def _remove_plots(out: Path) -> None:
    """Remove our plots of the replaced model (they would describe the old one); keep any other file."""
    names = plot_names(out / PLOTS)
    if names is None:
        return
    for n in names + [PLOTS_INDEX]:
        p = out / PLOTS / n
        if p.is_file() and not p.is_symlink():
            p.unlink()
    try:
        (out / PLOTS).rmdir()
    except OSError:  # the user's own files are in it: keep the folder
        pass


def only_ours(out: str | os.PathLike) -> bool:
    """Whether ``out`` is an artifact holding nothing nnsqueeze did not write (the demo replaces those)."""
    out = Path(out)
    if out.is_symlink() or not out.is_dir() or not marker_ok(out / MANIFEST):
        return False
    for p in out.iterdir():
        if p.name == PLOTS:
            names = plot_names(p)
            if names is None or any(q.name not in {*names, PLOTS_INDEX} for q in p.iterdir()):
                return False
        elif p.name not in ARTIFACT_FILES or p.is_symlink() or not p.is_file():
            return False
    return True


def check_out(out: str | os.PathLike, overwrite: bool = False, where: str | None = None) -> None:
    """The checks :func:`write_dir` makes before writing, for a pre-flight before a long run."""
    check_dir_target(out, ARTIFACT_FILES, MANIFEST, overwrite, where)


def write_dir(out: str | os.PathLike, files: dict[str, bytes | str], marker: str = MANIFEST,
              overwrite: bool = False, owned: Iterable[str] | None = None) -> Path:
    """Write ``files`` as the directory ``out`` (see :func:`nnsqueeze.safeio.write_dir`).

    A new or empty ``out`` appears whole by one rename. A non-empty one is refused unless
    ``overwrite``; then only ``owned`` names (for an artifact: :data:`ARTIFACT_FILES` and our
    ``plots/``) are replaced or removed, and nothing else in ``out`` is touched.
    """
    artifact = marker == MANIFEST
    owned = (ARTIFACT_FILES if artifact else ()) if owned is None else owned
    return safe_write_dir(out, files, marker, overwrite, owned, cleanup=_remove_plots if artifact else None)


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
    if manifest["format_version"] > MANIFEST_VERSION:
        raise ArtifactError(str(mpath), f"format version {manifest['format_version']} is newer than this "
                            f"nnsqueeze reads ({MANIFEST_VERSION})", fix="upgrade nnsqueeze")
    _check_steps(manifest.get("steps", []), str(mpath))
    return manifest


def _check_steps(steps: Any, where: str) -> None:
    """The manifest's step list has the shape ``load`` replays: ``[{name, config, record?}, ...]``."""
    if not isinstance(steps, list):
        raise ArtifactError(f"{where}: steps", f"must be a list, got {type(steps).__name__}",
                            fix="re-create the artifact")
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
            if manifest["format_version"] >= 2 and entry["name"] in REPLAYS:  # e.g. the latency guard's revert
                model = REPLAYS.get(entry["name"])(model, entry.get("record", {}))
                continue
            step_cls = STEPS.get(entry["name"], where=where)
            config = step_cls.Config.model_validate(entry.get("config", {}))
            model = step_cls.rebuild(model, config, entry.get("record", {}))
        except NnsqueezeError as e:  # a recorded layer missing from this model, a rank too large for it
            raise ArtifactError(f"{where}: {e.where}", e.problem, fix=e.fix or fix) from None
        # A crafted or mismatched record must not escape untyped: whatever the replay trips over
        # (missing module, index out of range, a shape torch refuses) is a bad artifact for this model.
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as e:
            raise ArtifactError(where, f"cannot replay step: {type(e).__name__}: {quote(str(e))}", fix=fix) from None
    from .safe_weights import with_versions

    sd = read_weights(path)
    try:
        sd = with_versions(unpack_state(model, sd), model)   # e.g. torchvision's MNASNet needs its version
        model.load_state_dict(sd, strict=True)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise ArtifactError(str(path / WEIGHTS), f"weights do not fit the model: {quote(str(e), 400)}",
                            fix=fix) from None
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
