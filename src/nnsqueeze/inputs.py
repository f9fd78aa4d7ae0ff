"""What the CLI's ``--model``, ``--weights`` and ``--data`` name, turned into a model and batches.

``module:factory`` is imported from the installed packages and PYTHONPATH, never from the current
directory; ``path/to/file.py:factory`` runs that file alone, under a private module name. A factory
is called with no arguments; whatever goes wrong is a ModelError/DataError naming the spec::

    >>> from nnsqueeze.inputs import call_factory
    >>> from nnsqueeze.errors import ModelError
    >>> call_factory("collections:OrderedDict", "--model", ModelError)
    OrderedDict()
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from .errors import DataError, ModelError, NnsqueezeError


def import_object(spec: str, what: str, error: type[NnsqueezeError]) -> Any:
    """Resolve ``module.path:name`` (imported from sys.path, never implicitly from the current
    directory) or ``path/to/file.py:name`` (loaded from that file alone)."""
    if ":" not in spec:
        raise error(what, f"{spec!r} is not of the form MODULE:NAME or path/to/file.py:NAME",
                    fix="e.g. mypkg.models:build_model or ./models.py:build_model")
    mod_name, _, attr = spec.rpartition(":")
    try:
        module = load_file(Path(mod_name), what, error) if mod_name.endswith(".py") else \
            importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise error(what, f"cannot import {mod_name!r}: {e}", fix=f"name a file instead, e.g. path/to/"
                    f"{mod_name.rpartition('.')[2]}.py:{attr} (the current directory is not searched), or "
                    "put the module's folder on PYTHONPATH") from None
    except NnsqueezeError:
        raise
    except BaseException as e:  # noqa: BLE001 - the user's module failed while importing
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise error(what, f"importing {mod_name!r} for {spec!r} failed: {describe_error(e)}",
                    fix="fix the module so that it imports cleanly (try: python -c 'import ...')") from None
    if not hasattr(module, attr):
        raise error(what, f"{mod_name!r} has no attribute {attr!r}", fix="check the factory name")
    return getattr(module, attr)


def load_file(path: Path, what: str, error: type[NnsqueezeError]) -> Any:
    """Execute the Python file ``path`` as a module of its own (never shadowing an installed one)."""
    if not path.is_file():
        raise error(what, f"file {path} not found", fix="check the path")
    # A private name: registering the file as, say, `numpy` would replace the real one everywhere.
    name = f"_nnsqueeze_file_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if name in sys.modules:  # --model and --data from the same file: one module
        return sys.modules[name]
    s = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(s)
    sys.modules[name] = module  # dataclasses and the like look their module up here
    try:
        s.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def describe_error(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    return f"{type(e).__name__}: {str(e)[:300]}"


def call_factory(spec: str, what: str, error: type[NnsqueezeError]) -> Any:
    """Import ``spec`` and call it with no arguments; its failures become ``error`` naming the spec."""
    factory = import_object(spec, what, error)
    if not callable(factory):
        raise error(what, f"{spec} is a {type(factory).__name__}, not a function", fix="name a factory function")
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise error(what, f"{spec} needs arguments ({e}); it is called with none",
                    fix="give its parameters defaults, or wrap it in a function that takes none") from None
    except ValueError:  # no signature to inspect (a builtin): just call it
        pass
    try:
        return factory()
    except NnsqueezeError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's own code raised; say so instead of a traceback
        raise error(what, f"{spec}() raised {describe_error(e)}",
                    fix="fix the factory (--debug shows the traceback)") from e


def load_weights(model: Any, path: Path) -> None:
    import torch

    from .limits import MAX_WEIGHTS_BYTES, open_regular, quote
    from .safe_weights import read_safetensors, with_versions

    if path.suffix == ".safetensors":  # every header field checked before a tensor is allocated
        sd = read_safetensors(path, ModelError, what="--weights file")
    else:  # weights_only: tensors and containers only, never arbitrary objects
        with open_regular(path, MAX_WEIGHTS_BYTES, "--weights file", ModelError) as f:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
                raise ModelError("--weights", f"cannot read {path}: {quote(str(e))}",
                                 fix="give a .safetensors file or a state_dict saved with torch.save") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        got = type(sd).__name__ if not isinstance(sd, dict) else "a dict holding non-tensors"
        raise ModelError("--weights", f"{path} is not a state_dict (names to tensors), got {got}",
                         fix="save model.state_dict(), not the model, a list or other objects")
    try:
        model.load_state_dict(with_versions(sd, model))
    except (RuntimeError, ValueError) as e:  # ValueError: a module's own check (MNASNet's version)
        raise ModelError("--weights", f"{path} does not fit the model: {quote(str(e), 300)}",
                         fix="check that --model builds the architecture these weights came from") from None


def model_from_spec(spec: str, has_weights: bool = True) -> Any:
    """``--model``: ``torchvision:NAME``/``timm:NAME`` (see nnsqueeze.images) or a factory."""
    if spec.partition(":")[0] in ("torchvision", "timm"):
        from .images import build_model

        if not has_weights:  # never silently: a zoo name alone is an untrained network
            logging.getLogger("nnsqueeze").warning(
                "%s without --weights: the network is randomly initialised, so its figures mean nothing "
                "for a trained model; pass --weights FILE", spec)
        return build_model(spec)
    return call_factory(spec, "--model", ModelError)


def data_from_spec(spec: str, model: Any = None, images: Optional[dict] = None) -> dict[str, Any]:
    """``--data``; ``images`` holds the --image-size/--mean/--std/--metric options for ``images:DIR``."""
    images = images or {}
    if spec.startswith("images:"):
        from .images import load_images

        opts = {k: v for k, v in images.items() if k != "metric"}
        return load_images(spec[len("images:"):], model, **opts, agreement=images.get("metric") == "agreement")
    flags = {"size": "--image-size", "mean": "--mean", "std": "--std"}
    given = [flag for k, flag in flags.items() if images.get(k) is not None]
    if given:
        raise DataError(given[0], "applies to --data images:DIR only", fix=f"drop {', '.join(given)}")
    if spec == "mnist1d":
        from .zoo import mnist1d

        d = mnist1d.load_data()
        return {"train": d["train"], "calib": d["calib"], "eval": d["test"]}
    data = call_factory(spec, "--data", DataError)
    if not isinstance(data, dict) or not ({"train", "calib", "eval", "test"} & set(data)):
        raise DataError("--data", f"{spec} must return a dict with keys among train, calib, eval (or test)",
                        fix="return {'train': batches, 'calib': batches, 'eval': batches}")
    if "eval" not in data and "test" in data:
        data["eval"] = data["test"]
    return data
