"""MNIST-1D: the embedded data set and CNN behind ``nnsqueeze demo``.

Everything is generated and trained locally (nothing is downloaded) and is deterministic for a
seed. Data (``.npz``) and trained weights (``.safetensors`` + ``.json``) are cached under
``$NNSQUEEZE_CACHE`` (default ``~/.cache/nnsqueeze``) in ``mnist1d/``; no pickle anywhere.

    >>> import torch
    >>> from nnsqueeze.zoo import mnist1d
    >>> data = mnist1d.load_data()                # {'train', 'test', 'calib'}: lists of (x, y)
    >>> x, y = data["test"][0]
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([128, 1, 40]), torch.float32, torch.int64)
    >>> model = mnist1d.pretrained()                                   # doctest: +SKIP
    >>> mnist1d.evaluate(model, data["test"]) >= 0.95                  # doctest: +SKIP
    True
    >>> small = mnist1d.train(mnist1d.build_model(), data, steps=20)   # a quick custom run (~1 s)
    >>> 0.2 < mnist1d.evaluate(small, data["test"]) < 0.95             # past chance (0.1) in 20 steps
    True

:func:`pretrained` trains once (~20-30 s on 2 cores; skipped in the doctests), then loads from the
cache in milliseconds.

Cache layout (``<cache>/mnist1d/``)::

    data-seed42-<hash>.npz           x, y, x_test, y_test (float32 / int64, as generated)
    cnn-<hash>.safetensors           state_dict of build_model() after train(...)
    cnn-<hash>.json                  test accuracy, config, config hash, sha256 of the weights
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

log = logging.getLogger("nnsqueeze")

__all__ = ["load_data", "build_model", "train", "pretrained", "evaluate", "cache_root",
           "DATA_ARGS", "TRAIN_CONFIG"]

FORMAT_VERSION = 1
SEQ_LEN = 40
NUM_CLASSES = 10

#: mnist1d's default generator arguments (4000 train / 1000 test); ``seed`` is set by load_data.
DATA_ARGS: dict[str, Any] = {
    "num_samples": 5000, "train_split": 0.8, "template_len": 12, "padding": [36, 60],
    "scale_coeff": 0.4, "max_translation": 48, "corr_noise_scale": 0.25, "iid_noise_scale": 2e-2,
    "shear_scale": 0.75, "shuffle_seq": False, "final_seq_length": SEQ_LEN,
}

#: The recipe :func:`pretrained` trains with (its hash names the cached weights).
TRAIN_CONFIG: dict[str, Any] = {
    "data_seed": 42, "batch_size": 128, "init_seed": 0, "train_seed": 0,
    "steps": 2000, "lr": 3e-3, "weight_decay": 5e-2, "max_shift": 8, "label_smoothing": 0.0,
}

ARCH = "conv1d(1-32k5,32-64k3s2,64-128k3s2)+bn+relu,fc(1280-128-10)"


# --------------------------------------------------------------------------- cache helpers

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` or ``$NNSQUEEZE_CACHE`` or ``~/.cache/nnsqueeze`` (not created here)."""
    if cache_dir is None:
        cache_dir = os.environ.get("NNSQUEEZE_CACHE") or Path.home() / ".cache" / "nnsqueeze"
    return Path(cache_dir).expanduser()


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_write(path: Path, write: Callable[[str], None], suffix: str) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cache files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- data

def _generate(seed: int) -> dict[str, np.ndarray]:
    """Run mnist1d's generator (it seeds numpy's/random's global RNGs: restore them after)."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(ObjectView(dict(DATA_ARGS, seed=seed)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": ds["x"].astype(np.float32), "y": ds["y"].astype(np.int64),
            "x_test": ds["x_test"].astype(np.float32), "y_test": ds["y_test"].astype(np.int64)}


def _raw_data(seed: int, cache_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
    path = cache_root(cache_dir) / "mnist1d" / f"data-seed{seed}-{content_hash([FORMAT_VERSION, DATA_ARGS])}.npz"
    keys = ("x", "y", "x_test", "y_test")
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in keys}
            if arrays["x"].shape[1:] == (SEQ_LEN,) and len(arrays["x"]) == len(arrays["y"]):
                return arrays
        except Exception as e:  # corrupt / truncated cache: regenerate
            log.warning("mnist1d: ignoring unreadable data cache %s (%s)", path, e)
    arrays = _generate(seed)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez must not append ".npz" to the name
            np.savez(f, **arrays)

    try:
        _atomic_write(path, write, ".npz")
    except OSError as e:  # read-only home etc.: the data is still usable
        log.warning("mnist1d: could not cache data at %s (%s)", path, e)
    return arrays


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def load_data(seed: int = 42, batch_size: int = 128,
              cache_dir: str | os.PathLike | None = None) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """MNIST-1D as ``{'train', 'test', 'calib'}``: lists of ``(x, y)`` batches.

    ``x`` is float32 ``(B, 1, 40)`` standardized with the training set's mean/std, ``y`` int64.
    ``train`` (4000 samples) is shuffled with a generator seeded by ``seed``; ``test`` (1000) and
    ``calib`` (the first 512 training samples) keep their order. Same seed -> identical tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    raw = _raw_data(seed, cache_dir)
    mean, std = float(raw["x"].mean(dtype=np.float64)), float(raw["x"].std(dtype=np.float64))
    norm = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32)).unsqueeze(1)  # noqa: E731
    x, y = norm(raw["x"]), torch.from_numpy(raw["y"].copy())
    x_test, y_test = norm(raw["x_test"]), torch.from_numpy(raw["y_test"].copy())
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return {
        "train": _batches(x[perm], y[perm], batch_size),
        "test": _batches(x_test, y_test, batch_size),
        "calib": _batches(x[:512], y[:512], batch_size),
    }


# --------------------------------------------------------------------------- model

def build_model() -> nn.Sequential:
    """The demo CNN: input ``(B, 1, 40)`` -> logits ``(B, 10)``; 196,810 parameters.

    Module names are stable: ``features.{0,3,6}`` Conv1d, ``features.{1,4,7}`` BatchNorm1d,
    ``classifier.0`` Linear(1280, 128), ``classifier.2`` Linear(128, 10).
    """
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Conv1d(64, 128, 3, stride=2, padding=1), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Flatten(),
        ),
        classifier=nn.Sequential(
            nn.Linear(128 * (SEQ_LEN // 4), 128), nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        ),
    ))


# --------------------------------------------------------------------------- train / eval

def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over ``(x, y)`` batches (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    correct = total = 0
    try:
        for x, y in batches:
            out = model(x.to(device))
            correct += int((out.argmax(-1).cpu() == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    return correct / total if total else 0.0


def _circular_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Roll each sample of ``x`` (B, C, L) by an independent shift in [-max_shift, max_shift]."""
    b, c, n = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 1), generator=gen)
    idx = (torch.arange(n).unsqueeze(0) - shift) % n
    return x.gather(2, idx.unsqueeze(1).expand(b, c, n).to(x.device))


def train(model: nn.Module, data: dict | list, steps: int = TRAIN_CONFIG["steps"], seed: int = 0, *,
          lr: float = TRAIN_CONFIG["lr"], weight_decay: float = TRAIN_CONFIG["weight_decay"],
          max_shift: int = TRAIN_CONFIG["max_shift"],
          label_smoothing: float = TRAIN_CONFIG["label_smoothing"],
          batch_size: int | None = None, log_every: int = 0,
          losses: list[float] | None = None) -> nn.Module:
    """Train ``model`` in place (and return it) on ``data['train']`` (or a list of batches).

    AdamW + one-cycle LR over ``steps`` minibatches drawn from per-epoch reshuffles of the training
    set, with random circular shifts of up to ``max_shift`` positions as augmentation.
    Deterministic for a ``seed`` (the global torch RNG is restored afterwards). Thread count is
    left to the caller. If ``losses`` is a list, the per-step training loss is appended to it.
    """
    batches = data["train"] if isinstance(data, dict) else data
    batches = list(batches)
    if not batches or steps < 1:
        raise ValueError("train: need at least one training batch and steps >= 1")
    x_all = torch.cat([b[0] for b in batches])
    y_all = torch.cat([b[1] for b in batches])
    bs = min(batch_size or len(batches[0][1]), len(y_all))
    device = _model_device(model)
    x_all, y_all = x_all.to(device), y_all.to(device)

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        gen = torch.Generator().manual_seed(seed)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
            loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
            model.train()
            perm, pos = torch.randperm(len(y_all), generator=gen), 0
            t0 = time.perf_counter()
            for step in range(steps):
                if pos + bs > len(perm):
                    perm, pos = torch.randperm(len(y_all), generator=gen), 0
                idx = perm[pos:pos + bs].to(device)
                pos += bs
                x, y = x_all[idx], y_all[idx]
                if max_shift:
                    x = _circular_shift(x, max_shift, gen)
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if losses is not None:
                    losses.append(loss.item())
                if log_every and (step + 1) % log_every == 0:
                    log.info("mnist1d train step %d/%d loss %.4f (%.1fs)", step + 1, steps,
                             loss.item(), time.perf_counter() - t0)
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    model.eval()
    return model


# --------------------------------------------------------------------------- pretrained

def _config() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "arch": ARCH, "data": DATA_ARGS, "train": TRAIN_CONFIG}


def _load_cached(weights: Path, meta_path: Path, config_hash: str) -> nn.Module | None:
    if not (weights.exists() and meta_path.exists()):
        return None
    try:
        from safetensors.torch import load_file

        meta = json.loads(meta_path.read_text())
        if meta.get("config_hash") != config_hash or meta.get("sha256") != _sha256_file(weights):
            log.warning("mnist1d: cached weights %s do not match their metadata; retraining", weights)
            return None
        model = build_model()
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model.eval()
    except Exception as e:  # corrupt cache: retrain
        log.warning("mnist1d: ignoring unreadable cached weights %s (%s)", weights, e)
        return None


def pretrained(cache_dir: str | os.PathLike | None = None, force: bool = False) -> nn.Module:
    """The trained demo CNN (eval mode). Trains once with :data:`TRAIN_CONFIG`, then loads from cache.

    ``force=True`` retrains and overwrites the cache. Weights are stored as safetensors next to a
    JSON file with the test accuracy and the config hash; both are written atomically.
    """
    config = _config()
    config_hash = content_hash(config)
    root = cache_root(cache_dir) / "mnist1d"
    weights, meta_path = root / f"cnn-{config_hash}.safetensors", root / f"cnn-{config_hash}.json"
    if not force:
        model = _load_cached(weights, meta_path, config_hash)
        if model is not None:
            return model

    cfg = TRAIN_CONFIG
    data = load_data(seed=cfg["data_seed"], batch_size=cfg["batch_size"], cache_dir=cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["init_seed"])
        model = build_model()
    t0 = time.perf_counter()
    log.info("mnist1d: training the demo CNN (%d steps, once; cached in %s)", cfg["steps"], root)
    train(model, data, steps=cfg["steps"], seed=cfg["train_seed"], lr=cfg["lr"],
          weight_decay=cfg["weight_decay"], max_shift=cfg["max_shift"],
          label_smoothing=cfg["label_smoothing"])
    seconds = time.perf_counter() - t0
    acc = evaluate(model, data["test"])
    log.info("mnist1d: test accuracy %.4f after %.1fs", acc, seconds)

    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"config_hash": config_hash}),
                      ".safetensors")
        meta = {"test_accuracy": acc, "config_hash": config_hash, "config": config,
                "sha256": _sha256_file(weights), "params": sum(p.numel() for p in model.parameters()),
                "train_seconds": round(seconds, 2), "torch": torch.__version__}
        _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"),
                      ".json")
    except OSError as e:
        log.warning("mnist1d: could not cache weights in %s (%s)", root, e)
    return model.eval()
