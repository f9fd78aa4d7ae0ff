"""Bounds on the work and memory any untrusted input may cost, and the helpers that enforce them.

nnsqueeze trusts the code named with ``--model``/``--data`` and nothing else: recipes, manifests,
reports and weight files may come from someone else, so every reader checks them against these
limits before it allocates or recurses. ``docs/security.md`` lists the same values; keep both in step.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: errors.py imports this module for its message bound
    from .errors import NnsqueezeError

log = logging.getLogger(__name__)

MAX_RECIPE_BYTES = 1 << 20          # a recipe file (YAML or JSON): 1 MiB
MAX_YAML_ALIASES = 100              # '*alias' references in one recipe
MAX_YAML_NODES = 100_000            # nodes of a recipe with every alias expanded (billion laughs)
MAX_DEPTH = 64                      # nesting of any recipe, manifest, report or safetensors header
MAX_JSON_BYTES = 64 << 20           # nnsqueeze.json, report.json: 64 MiB
MAX_WEIGHTS_BYTES = 64 << 30        # a safetensors or torch weights file: 64 GiB
MAX_HEADER_BYTES = 100 << 20        # a safetensors JSON header: 100 MiB (the format's own cap)
MAX_PLOT_ROWS = 2_000              # layers drawn by `nnsqueeze plot` (figure height grows with them)
MAX_GENERATOR_BATCHES = 100_000     # batches read from a one-shot generator (held in memory): an endless one stops here
MAX_QUOTE_CHARS = 200               # input quoted back in an error message
MAX_MESSAGE_CHARS = 4000            # any one part (where / problem / fix) of an error message


def quote(value: Any, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error never echoes a whole hostile input."""
    try:
        text = repr(value)
    except RecursionError:  # a self-referencing or absurdly deep structure
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"


def clip(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """A string cut to ``limit`` characters (no quotes added)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of lists/tuples/dicts in ``value``, counted without recursion; stops past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in children)
    return deepest


def check_depth(value: Any, where: str, error: type[NnsqueezeError], limit: int = MAX_DEPTH) -> None:
    if depth(value, limit) > limit:
        raise error(where, f"nested more than {limit} levels deep",
                    fix="flatten the structure; no valid file nests this deep")


def open_regular(path: str | os.PathLike, max_bytes: int, what: str, error: type[NnsqueezeError]):
    """Open ``path`` for binary reading, refusing anything but a regular file of at most ``max_bytes``.

    Links are followed, then the opened descriptor itself is checked (no race between check and
    open), so a link to ``/dev/zero``, a FIFO or a directory is refused before a byte is read.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        raise error(str(path), f"{what} not found", fix="check the path") from None
    except OSError as e:
        raise error(str(path), f"cannot open {what}: {e.strerror}", fix="check the path and its permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket"
            raise error(str(path), f"{what} is {kind}, not a regular file", fix="give a regular file")
        if st.st_size > max_bytes:
            raise error(str(path), f"{what} is {st.st_size:,} bytes, over the limit of {max_bytes:,}",
                        fix=f"no valid {what} is this large (nnsqueeze.limits)")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str, error: type[NnsqueezeError]) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (checked before and while reading)."""
    with open_regular(path, max_bytes, what, error) as f:
        data = f.read(max_bytes + 1)  # the file may grow after the size check
    if len(data) > max_bytes:
        raise error(str(path), f"{what} is over the limit of {max_bytes:,} bytes", fix="give a smaller file")
    return data


def read_text(path: str | os.PathLike, max_bytes: int, what: str, error: type[NnsqueezeError]) -> str:
    """A bounded regular file decoded as UTF-8; other encodings are an ``error``."""
    data = read_bytes(path, max_bytes, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(str(path), f"{what} is not UTF-8 text (byte {e.start})", fix="save the file as UTF-8") from None


def loads_json(text: str | bytes, where: str, what: str, error: type[NnsqueezeError]) -> Any:
    """JSON parsed with its nesting bounded by :data:`MAX_DEPTH`; malformed JSON is an ``error``."""
    import json

    try:
        value = json.loads(text)
    except RecursionError:
        raise error(where, f"{what} is nested more than the interpreter allows",
                    fix="no valid file nests this deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(where, f"corrupt {what}: {clip(str(e))}", fix="re-create the file") from None
    check_depth(value, where, error)
    return value


def read_json(path: str | os.PathLike, what: str, error: type[NnsqueezeError], max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A bounded JSON file: regular file, at most ``max_bytes``, UTF-8, nested at most :data:`MAX_DEPTH`."""
    return loads_json(read_text(path, max_bytes, what, error), str(path), what, error)


def cap_threads(n: int, what: str = "threads") -> int:
    """``n`` capped at the machine's CPU count (logged when capped): thousands of threads stall ORT."""
    cpus = os.cpu_count() or 1
    if n > cpus:
        log.warning("%s: %d capped at %d, this machine's CPU count", what, n, cpus)
        return cpus
    return n
