"""Data handling shared by all steps: batches are ``(inputs, targets)`` tuples or dicts.

- tuple/list batch: ``inputs = batch[0]`` (a tensor, or a tuple of tensors passed positionally),
  ``targets = batch[1]`` (optional);
- dict batch (Hugging Face style): passed as keyword arguments; ``labels`` is the target.

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.data import call_model, split
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(40, 10))
    >>> data = [(torch.randn(32, 1, 40), torch.randint(0, 10, (32,)))]
    >>> inputs, targets = split(data[0])
    >>> call_model(model, inputs).shape
    torch.Size([32, 10])
    >>> split({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[2, 3, 4]])})[1]
    tensor([[2, 3, 4]])

User code run here is fenced: an exception raised while iterating the user's data
(:class:`Batches`) or inside the user's model forward (:func:`call_model`) becomes a
:class:`DataError` / :class:`ModelError` naming the stage (set by the runner with :func:`stage`,
e.g. ``steps[1].quantize``), the data and the batch index, raised ``from`` the original so that
``--debug`` still shows its traceback. Exceptions raised by nnsqueeze's own code keep their type:
those are bugs, not user errors.

    >>> call_model(model, torch.randn(2, 1, 7))
    Traceback (most recent call last):
    ...
    nnsqueeze.errors.ModelError: model: the model's forward raised RuntimeError: mat1 and mat2 ...
      fix: fix the model or its inputs (rerun with --debug for the original traceback)
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import DataError, ModelError, NnsqueezeError
from .limits import MAX_GENERATOR_BATCHES

Batch = Any
log = logging.getLogger("nnsqueeze")

# Where the runner is (e.g. "steps[1].quantize", "baseline evaluation"), for error locations.
_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("nnsqueeze_stage", default="")
_EMPTY = object()  # next()'s default: no first batch
# The user batch being processed, as (data name, index, input shapes); None outside a data pass.
_BATCH: list[tuple[str, int, Any] | None] = [None]


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage that errors raised inside the block are located in."""
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)


def at_stage(*parts: str | None) -> str:
    return ": ".join(p for p in (_STAGE.get(), *parts) if p)


def describe(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of an exception, truncated."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > limit:
        msg = msg[:limit] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def shapes(inputs: Any) -> Any:
    """Shapes of batch inputs (tensor, tuple of tensors, dict of tensors), for messages."""
    if isinstance(inputs, torch.Tensor):
        return tuple(inputs.shape)
    if isinstance(inputs, dict):
        return {k: shapes(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return [shapes(v) for v in inputs]
    return type(inputs).__name__


class Batches:
    """The user's data, re-iterable, with every batch's index known and iteration errors typed.

    The first batch's input shapes are kept: when the model fails on a batch whose shapes differ
    from them, the error names both (:func:`call_model`).
    """

    def __init__(self, data: Iterable, where: str, refuse_nan: bool = False):
        self.data, self.where, self.refuse_nan = data, where, refuse_nan
        self.first: Any = None

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]  # TypeError when the data has no len, as before

    def __iter__(self) -> Iterator[Batch]:
        try:
            it = iter(self.data)
        except NnsqueezeError:
            raise
        except Exception as e:
            raise DataError(at_stage(self.where), f"iterating the data raised {describe(e)}",
                            fix="fix the data loader (rerun with --debug for its traceback)") from e
        i, prev = 0, _BATCH[0]
        try:
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    return
                except NnsqueezeError:
                    raise
                except Exception as e:
                    raise DataError(at_stage(f"{self.where} batch {i}"), f"reading the batch raised {describe(e)}",
                                    fix="fix the data loader or generator (rerun with --debug for its "
                                    "traceback)") from e
                inputs = split(batch)[0] if isinstance(batch, (tuple, list, dict, torch.Tensor)) else batch
                bad = _nan_at(inputs) if self.refuse_nan else None
                if bad is not None:  # NaN ranges, NaN metrics: every figure computed from it would be wrong
                    raise DataError(at_stage(f"{self.where} batch {i}"), f"inputs{bad} hold NaN values",
                                    fix="clean or impute the data before compressing (NaN makes calibration "
                                    "ranges, losses and metrics meaningless)")
                if i == 0 and self.first is None:
                    self.first = shapes(inputs)
                _BATCH[0] = (self.where, i, self.first)
                yield batch
                i += 1
        finally:
            _BATCH[0] = prev


def _nan_at(inputs: Any, path: str = "") -> str | None:
    """The place (``""``, ``[1]``, ``['x']``) of the first floating tensor in ``inputs`` holding NaN,
    or None. Infinities are allowed: additive attention masks legitimately hold -inf."""
    if isinstance(inputs, torch.Tensor):
        return path if inputs.is_floating_point() and bool(torch.isnan(inputs).any()) else None
    items = inputs.items() if isinstance(inputs, dict) else (
        enumerate(inputs) if isinstance(inputs, (tuple, list)) else ())
    for k, v in items:
        found = _nan_at(v, f"{path}[{k!r}]")
        if found is not None:
            return found
    return None


def as_batches(data: Iterable | None, where: str, required: bool = False,
               refuse_nan: bool = False) -> list | Iterable | None:
    """Validate ``data``: re-iterable and non-empty. One-shot iterators are materialised once (at
    most MAX_GENERATOR_BATCHES batches). ``refuse_nan`` (the API's entry points): a batch whose
    inputs hold NaN is a DataError naming it, on every pass (steps given raw data name the layer)."""
    if data is None:
        if required:
            raise DataError(where, "no data given", fix=f"pass {where}=... (an iterable of (inputs, targets) batches)")
        return None
    if isinstance(data, torch.Tensor):
        raise DataError(where, "got a bare tensor, expected an iterable of batches",
                        fix="wrap it: [(inputs, targets)] or use a torch DataLoader")
    try:
        it = iter(data)
    except TypeError:
        raise DataError(where, f"{type(data).__name__} is not iterable",
                        fix="pass a list of (inputs, targets) batches or a DataLoader") from None
    if isinstance(data, Batches):
        return data
    if isinstance(data, (str, bytes, dict)):  # iterable, but of characters / keys, never of batches
        raise DataError(where, f"got a {type(data).__name__}, expected an iterable of batches",
                        fix="pass a list of (inputs, targets) batches or a DataLoader")
    if it is data:  # a generator: would be exhausted after the first pass, so it is read once, bounded
        data = []
        while True:
            try:
                data.append(next(it))
            except StopIteration:
                break
            except NnsqueezeError:
                raise
            except Exception as e:
                raise DataError(f"{where} batch {len(data)}", f"the data generator raised {describe(e)}",
                                fix="fix the generator (rerun with --debug for its traceback)") from e
            if len(data) > MAX_GENERATOR_BATCHES:  # an endless generator would hang and fill memory
                raise DataError(where, f"the data generator yielded more than {MAX_GENERATOR_BATCHES:,} batches "
                                "without ending (a one-shot generator is read whole and held in memory)",
                                fix="bound it, e.g. itertools.islice(gen, n), or pass a list or a re-iterable "
                                "loader (a DataLoader is read batch by batch, never held whole)")
    data = Batches(data, where, refuse_nan)
    first = next(iter(data), _EMPTY)
    if first is _EMPTY:
        raise DataError(where, "data is empty", fix="give at least one batch")
    if not isinstance(first, (tuple, list, dict, torch.Tensor)):
        raise DataError(where, f"a batch is a {type(first).__name__}",
                        fix="each batch must be (inputs, targets), a dict of tensors, or an input tensor")
    if isinstance(first, (tuple, list)) and len(first) == 0:
        raise DataError(f"{where} batch 0", "empty batch tuple", fix="batches are (inputs, targets)")
    return data


def split(batch: Batch) -> tuple[Any, Any]:
    """(inputs, targets) of a batch; targets may be None."""
    if isinstance(batch, dict):
        return batch, batch.get("labels")
    if isinstance(batch, torch.Tensor):
        return batch, None
    if len(batch) == 0:
        raise DataError("batch", "empty batch tuple", fix="batches are (inputs, targets)")
    return batch[0], (batch[1] if len(batch) > 1 else None)


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module | Any, inputs: Any) -> Any:
    """Run ``model`` on batch inputs (tensor, tuple of tensors, or dict of keyword arguments).

    An exception raised by the user's model (not by nnsqueeze's own modules inside it) becomes a
    :class:`ModelError` naming the stage and batch, or a :class:`DataError` naming both shapes when
    the batch's input shapes differ from the first batch's (mismatched batches).
    """
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)
    except NnsqueezeError:
        raise
    except Exception as e:
        cur = _BATCH[0]
        if cur is not None:  # a batch unlike the first fails, in the model or in nnsqueeze's layers
            name, i, first = cur
            now = shapes(inputs)
            if i > 0 and first is not None and now != first:
                raise DataError(at_stage(f"{name} batch {i}"), f"inputs of shape {now} differ from batch 0's {first} "
                                f"and the model fails on them ({describe(e, 200)})",
                                fix="give batches of one input shape (pad or resize them)") from e
        if not _raised_by_user(e):
            raise
        where = at_stage(f"{cur[0]} batch {cur[1]}" if cur is not None else None) or "model"
        raise ModelError(where, f"the model's forward raised {describe(e)}",
                         fix="fix the model or its inputs (rerun with --debug for the original traceback)") from e


_LIBS: tuple[str, ...] | None = None
_OWN = str(Path(__file__).resolve().parent)


def _libs() -> tuple[str, ...]:
    """Source roots of the libraries whose frames tell nothing about who is at fault."""
    global _LIBS
    if _LIBS is None:
        roots = {sysconfig.get_paths()["stdlib"], str(Path(torch.__file__).resolve().parent)}
        for name in ("onnxruntime", "onnx", "numpy"):
            mod = sys.modules.get(name)
            if mod is not None and getattr(mod, "__file__", None):
                roots.add(str(Path(mod.__file__).resolve().parent))
        _LIBS = tuple(roots)
    return _LIBS


def _raised_by_user(e: BaseException) -> bool:
    """Whether the deepest frame below the caller that is neither torch nor the standard library is
    outside nnsqueeze (the user's model code) -- or there is none (a torch layer of the user's model
    failed on its inputs). A failure inside nnsqueeze's own modules is a bug and stays untyped."""
    tb, last = e.__traceback__, None
    tb = tb.tb_next if tb is not None else None  # skip call_model's own frame
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if not f.startswith("<"):
            f = str(Path(f).resolve())
            if not f.startswith(_libs()):
                last = f
        tb = tb.tb_next
    return last is None or not last.startswith(_OWN)


_SAID: set[tuple[str, ...]] = set()


def logits(output: Any, strict: bool = True) -> torch.Tensor:
    """The main tensor of a model output: a tensor, the first of a tuple, ``.logits`` (Hugging Face
    outputs), the ``logits`` entry or the only entry of a dict. A dict with several entries and no
    ``logits`` is ambiguous: a :class:`ModelError` asks which one to score, never a silent guess
    (``strict=False``: its first entry, for output-vs-output comparisons that need no prediction)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        keys = tuple(output)
        if "logits" in output:
            if len(keys) > 1 and keys not in _SAID:  # say once which entry is used, not per batch
                _SAID.add(keys)
                log.info("model output is a dict with keys %s: scoring its 'logits' entry", list(keys))
            return output["logits"]
        if (len(keys) == 1 or not strict) and keys and isinstance(output[keys[0]], torch.Tensor):
            return output[keys[0]]
        raise ModelError(at_stage("model output"), f"the model returns a dict with keys {list(keys)} and no 'logits' "
                         "entry: which one is the prediction is ambiguous",
                         fix="name the prediction 'logits', return it alone, or pass metric=/loss_fn= callables "
                         "that pick it")
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise DataError("model output", f"cannot find a tensor in a {type(output).__name__}",
                    fix="return a tensor, a tuple, or an object with .logits")


def as_tuple(inputs: Any) -> tuple:
    """Example inputs as the positional tuple torch.onnx.export expects."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, dict):
        return (inputs,)  # exported with kwargs dict as the last positional argument
    return tuple(inputs)


def take(data: Iterable, samples: int | None) -> list:
    """First batches of ``data`` covering at least ``samples`` examples (all if None)."""
    out, n = [], 0
    for batch in data:
        out.append(batch)
        inputs, _ = split(batch)
        t = next(iter(inputs.values())) if isinstance(inputs, dict) else (
            inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
        n += int(t.shape[0]) if t.dim() else 1
        if samples is not None and n >= samples:
            break
    if isinstance(data, Batches):  # a list still, whose batches keep their names for error messages
        return _Taken(out, data.where, data.first)
    return out


class _Taken(list):
    """The first batches of a :class:`Batches`: a plain list that tracks the batch being processed."""

    def __init__(self, items: list, where: str, first: Any):
        super().__init__(items)
        self.where, self.first = where, first

    def __iter__(self) -> Iterator[Batch]:
        prev = _BATCH[0]
        try:
            for i, batch in enumerate(super().__iter__()):
                _BATCH[0] = (self.where, i, self.first)
                yield batch
        finally:
            _BATCH[0] = prev


def batch_size(inputs: Any) -> int:
    """Examples in a batch's inputs: the first dimension of its (first) tensor; 1 for anything else."""
    t = next(iter(inputs.values())) if isinstance(inputs, dict) else (
        inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() else 1


@torch.no_grad()
def forward_samples(model: nn.Module, data: Iterable, samples: int | None, device: Any) -> tuple[int, int]:
    """Run ``model`` on the inputs of the first ``samples`` examples of ``data`` (a calibration pass:
    observers inside the model see them); returns (examples, batches)."""
    n_samples = n_batches = 0
    for batch in take(data, samples):
        inputs, _ = split(batch)
        call_model(model, to_device(inputs, device))
        n_samples += batch_size(inputs)
        n_batches += 1
    return n_samples, n_batches
