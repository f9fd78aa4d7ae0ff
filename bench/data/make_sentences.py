"""Regenerate ``sentences.txt``: English sentences from Python's own bundled documentation.

Sources: ``pydoc_data.topics`` (the language reference topics shipped with CPython) and the
docstrings of a fixed list of stdlib modules. Text is split into sentences; only plain prose is
kept (40-220 characters, starts with a capital letter, ends with a full stop, few symbols), then
deduplicated and sampled with a fixed seed. Run once; the output is committed::

    python bench/data/make_sentences.py            # writes bench/data/sentences.txt (1024 lines)
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from pathlib import Path

MODULES = ["os", "re", "json", "collections", "itertools", "functools", "pathlib", "subprocess", "threading",
           "asyncio", "logging", "argparse", "datetime", "decimal", "fractions", "statistics", "random",
           "string", "textwrap", "typing", "dataclasses", "enum", "csv", "sqlite3", "email", "http.client",
           "urllib.request", "socket", "shutil", "tempfile", "zipfile", "tarfile", "gzip", "pickle", "copy",
           "heapq", "bisect", "array", "struct", "codecs", "unicodedata", "difflib", "inspect", "ast",
           "dis", "traceback", "warnings", "contextlib", "abc", "io", "time", "calendar", "locale",
           "gettext", "unittest", "doctest", "pdb", "timeit", "trace", "platform", "sysconfig", "venv"]
N = 1024
SEED = 0


def texts():
    from pydoc_data.topics import topics

    yield from topics.values()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        yield inspect.getdoc(mod) or ""
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                yield inspect.getdoc(obj) or ""


def sentences(text: str):
    text = re.sub(r"\s+", " ", text)
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = s.strip()
        if not (40 <= len(s) <= 220) or not s[0].isupper() or not s.endswith("."):
            continue
        if sum(not (c.isalnum() or c in " ,.'-;:()") for c in s) > 2 or re.search(r"\w\.\w|>>>|\(\)|_\w", s):
            continue
        yield s


def main() -> None:
    seen, out = set(), []
    for t in texts():
        for s in sentences(t):
            if s not in seen:
                seen.add(s)
                out.append(s)
    random.Random(SEED).shuffle(out)
    if len(out) < N:
        raise SystemExit(f"only {len(out)} sentences found")
    path = Path(__file__).with_name("sentences.txt")
    path.write_text("\n".join(out[:N]) + "\n", encoding="utf-8")
    print(f"{len(out)} candidates, wrote {N} to {path}")


if __name__ == "__main__":
    main()
