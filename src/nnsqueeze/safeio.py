"""Safe writes: the checks and atomic writers behind every file and directory nnsqueeze writes.

The rules (see README, "Where results are written"):

* never delete or overwrite what nnsqueeze did not write: a non-empty output directory is refused
  unless ``overwrite`` is asked for, and then only the names nnsqueeze owns are replaced;
* find an unusable output location (a file in the way, no write permission, a read-only disk)
  before any work starts, with a real probe: root ignores permission bits, so ``os.access`` cannot;
* a failed write leaves no temporary file behind, and a new (or empty) output directory appears
  whole or not at all (one directory rename).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ArtifactError, NnsqueezeError

LOCK = ".nnsqueeze.lock"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), released on exit and when the process dies."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (``path`` made absolute first)."""
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def probe_writable(path: str | os.PathLike, where: str, error: type[NnsqueezeError] = ArtifactError) -> None:
    """Raise ``error`` unless ``path`` (a file or directory to create or replace) can be written.

    Creates and removes a temporary file in the nearest existing directory at or above ``path``.
    """
    path = Path(path)
    base = nearest_existing(path if path.is_dir() else path.parent)
    if not base.is_dir():
        raise error(where, f"cannot create {path}: {base} is a file, not a directory",
                    fix="choose an output path that is not under a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".nnsqueeze-probe-", dir=base)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise error(where, f"cannot write in {base}: {e.strerror or e}",
                    fix="choose a writable location (check permissions, free space, read-only mounts)") from None


def check_file_target(path: str | os.PathLike, where: str, error: type[NnsqueezeError] = ArtifactError,
                      overwrite: bool = True) -> None:
    """Checks before writing the file ``path``: not a directory, not an existing file unless
    ``overwrite``, and its location writable (missing parent directories are created on write)."""
    path = Path(path)
    if path.is_dir():
        raise error(where, f"{path} is a directory", fix="give a file path, e.g. out/model.onnx")
    if not overwrite and os.path.lexists(path):
        raise error(where, f"{path} already exists", fix="pass --overwrite to replace it, or choose another path")
    probe_writable(path, where, error)


def write_file(path: str | os.PathLike, data: bytes, where: str, error: type[NnsqueezeError] = ArtifactError,
               overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temp file beside it, fsync, rename); checks first."""
    path = Path(path)
    check_file_target(path, where, error, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def marker_ok(path: Path) -> bool:
    """Whether ``path`` is a marker nnsqueeze writes: a manifest (integer ``format_version``) or a
    plots index (a ``plots`` list). ``{}`` or a user's file of the same name is not proof."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and (isinstance(d.get("format_version"), int) or isinstance(d.get("plots"), list))


def _is_cwd(path: Path) -> bool:
    try:
        return path.resolve() == Path.cwd().resolve()
    except OSError:
        return False


def check_dir_target(out: str | os.PathLike, owned: Iterable[str], marker: str, overwrite: bool,
                     where: str | None = None) -> None:
    """Every check :func:`write_dir` makes before writing, for a pre-flight before a long run."""
    out = Path(out)
    where = f"{where} {out}" if where else str(out)
    if os.path.lexists(out) and not out.is_dir():
        raise ArtifactError(where, "exists and is not a directory", fix="choose another --out path")
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    if entries and _is_cwd(out):  # writing into the user's project folder is never what was meant
        raise ArtifactError(where, "is the current directory and it is not empty",
                            fix="give a new directory, e.g. --out out/ (an empty current directory works too)")
    if entries and not overwrite:
        kind = ("an nnsqueeze artifact that exists already" if marker_ok(out / marker)
                else "a non-empty directory that is not an nnsqueeze artifact")
        raise ArtifactError(where, f"is {kind}",
                            fix="choose a new or empty output directory, or pass --overwrite (API: overwrite=True) "
                                "to replace the files nnsqueeze writes there and keep everything else")
    odd = sorted(n for n in owned if (out / n).is_symlink() or (out / n).is_dir())
    if odd:  # a directory or link where we write a file: renaming onto it would fail half-way
        raise ArtifactError(where, f"holds {', '.join(odd)} as a directory or link, where nnsqueeze writes a file",
                            fix="choose a new or empty output directory")
    if entries and not marker_ok(out / marker):
        clash = sorted(set(entries) & set(owned))
        if clash:  # the names we would replace are there, but nothing proves we wrote them
            raise ArtifactError(where, f"is not an nnsqueeze artifact but holds {', '.join(clash)}, which "
                                "nnsqueeze did not write; not replacing them",
                                fix="choose a new or empty output directory")
    probe_writable(out, where)


def write_dir(out: str | os.PathLike, files: dict[str, bytes | str], marker: str, overwrite: bool = False,
              owned: Iterable[str] = (), cleanup: Callable[[Path], None] | None = None) -> Path:
    """Write ``files`` (name -> content) as the directory ``out``.

    A new or empty ``out``: a temporary sibling directory, then one rename (whole or nothing; a
    rival writer that got there first makes the rename fail, and this writer raises). A non-empty
    ``out`` needs ``overwrite``: then, under a lock file, the old ``marker`` goes first, each file
    is renamed into place, names in ``owned`` that this write lacks are removed (``cleanup(out)``
    removes more of ours), and the new ``marker`` comes last; everything else in ``out`` is kept.
    """
    out = Path(out)
    owned = set(owned) | set(files)
    check_dir_target(out, owned, marker, overwrite)
    if out.is_dir() and (any(out.iterdir()) or _is_cwd(out) or out.is_symlink()):
        return _write_in_place(out, files, marker, owned, cleanup)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _fill(tmp, files)
        try:
            os.replace(tmp, out)  # onto nothing or an empty directory; never onto files
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise ArtifactError(str(out), "was written by another process while this one was writing; "
                                    "kept the other's (complete) artifact",
                                    fix="write each run to its own --out directory") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fill(d: Path, files: dict[str, bytes | str]) -> None:
    for name, data in files.items():
        if Path(name).name != name or name in (".", ".."):
            raise ValueError(f"artifact file names are plain names, got {name!r}")
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(d / name, 0o644)


def _write_in_place(out: Path, files: dict[str, bytes | str], marker: str, owned: set[str],
                    cleanup: Callable[[Path], None] | None) -> Path:
    try:  # O_EXCL: one writer at a time; a second one fails here instead of mixing files
        fd = os.open(out / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ArtifactError(str(out), "another nnsqueeze process is writing this directory",
                            fix=f"wait for it, or write to another --out; if none is running, delete {out / LOCK}"
                            ) from None
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        tmp = Path(tempfile.mkdtemp(prefix=".nnsqueeze-", suffix=".tmp", dir=out))
        try:
            _fill(tmp, files)  # everything that can fail (disk full) happens before the first rename
            # Readers see "not an artifact" until the new marker lands, never a mix that loads.
            if marker in files and (out / marker).is_file():
                os.unlink(out / marker)
            for name in files:
                if name != marker:
                    os.replace(tmp / name, out / name)
            for name in owned - set(files):
                p = out / name
                if p.is_file() and not p.is_symlink():
                    p.unlink()
            if cleanup is not None:
                cleanup(out)
            if marker in files:
                os.replace(tmp / marker, out / marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        Path(out / LOCK).unlink(missing_ok=True)
    return out
