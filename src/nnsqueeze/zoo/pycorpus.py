"""The text corpus behind the embedded language model: English and Python that ships with Python.

Two sources, both read from the running interpreter's installation (no network, no download):

- ``pydoc_data.topics.topics``: the language reference topics ``help()`` shows (one document per
  topic, named ``topic:<key>``);
- the docstrings of standard-library source files, parsed with :mod:`ast` (nothing is imported or
  executed): the module, class, function and method docstrings of one file, in source order, joined
  by blank lines, make one document named ``module:<dotted name>``. Docstrings shorter than 20
  characters are dropped. Files: every public top-level module of ``sys.stdlib_module_names``
  (minus :data:`EXCLUDED`) and, for packages, every ``.py`` file under the package directory except
  test directories/files (sorted paths).

Split (fixed by document name, independent of Python version and of the document order): a document
is in ``validation`` when ``zlib.crc32(name) % 10 == 0`` (about 10%), else in ``train``. Whole
modules/topics are held out, so validation text is never seen in training.

``size="tiny"`` (tests) uses the topics plus the modules in :data:`TINY_MODULES` only.

The corpus depends on the Python version (3.11: 1.66 MB of text, 79 topics and 316 module
documents; 357 train / 38 validation documents); :func:`corpus_hash` names it in every cache key.

    >>> from nnsqueeze.zoo import pycorpus
    >>> c = pycorpus.load_corpus("tiny")            # load_corpus() for the whole corpus (seconds)
    >>> sorted(c), len(c["train"]) > len(c["validation"]) > 0
    (['train', 'validation'], True)
    >>> bisect = next(d for d in c["train"] if d.name == "module:bisect")
    >>> bisect.text[:20]
    'Bisection algorithms'
    >>> pycorpus.split_of("module:bisect"), pycorpus.split_of("topic:continue")   # crc32(name) % 10
    ('train', 'validation')
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["Document", "documents", "load_corpus", "split_of", "corpus_hash", "EXCLUDED", "TINY_MODULES"]

#: Standard-library names left out: test suites, GUI/demo code, vendored or generated sources.
EXCLUDED = frozenset({
    "antigravity", "this", "idlelib", "test", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "distutils", "__phello__", "__hello__", "venv",
    "encodings",  # ~100 generated codec files with the same boilerplate docstring
})

#: The modules of ``size="tiny"`` (small, stable, in every supported Python).
TINY_MODULES = ("abc", "bisect", "colorsys", "heapq", "keyword", "textwrap", "fnmatch", "shlex")

MIN_DOCSTRING = 20
VALIDATION_MOD = 10


@dataclass(frozen=True)
class Document:
    name: str   # "topic:<key>" or "module:<dotted.name>"
    text: str


def split_of(name: str) -> str:
    """``'validation'`` when ``crc32(name) % 10 == 0``, else ``'train'`` (fixed by the name only)."""
    return "validation" if zlib.crc32(name.encode()) % VALIDATION_MOD == 0 else "train"


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):  # a file this interpreter cannot parse: not text we use
        return ""
    out = []
    # ast.walk is breadth-first; sort by line so a document reads in source order.
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(tree) if isinstance(n, documented)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_DOCSTRING:
            out.append(doc.strip())
    return "\n\n".join(out)


def _module_files(name: str) -> list[tuple[str, Path]]:
    """(dotted name, path) of the source files of stdlib module ``name`` (packages: all non-test files)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []  # built-in or extension module: no source
    origin = Path(spec.origin)
    if origin.name != "__init__.py":
        return [(name, origin)]
    root = origin.parent
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part.startswith("test") or part == "__pycache__" for part in rel.parts):
            continue
        parts = [name, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files.append((".".join(parts), p))
    return files


@lru_cache(maxsize=4)
def documents(size: str = "default") -> tuple[Document, ...]:
    """All documents (both splits) sorted by name; deterministic for a Python installation."""
    if size not in ("default", "tiny"):
        raise ValueError(f"size must be 'default' or 'tiny', got {size!r}")
    from pydoc_data.topics import topics

    docs = [Document(f"topic:{k}", v.strip()) for k, v in topics.items() if v.strip()]
    if size == "tiny":
        names = list(TINY_MODULES)
        docs = [d for d in docs if len(d.text) < 4000]  # the short topics only
    else:
        names = [n for n in sorted(sys.stdlib_module_names) if not n.startswith("_") and n not in EXCLUDED]
    seen = set()
    for name in names:
        for dotted, path in _module_files(name):
            if dotted in seen:
                continue
            seen.add(dotted)
            text = _docstrings(path)
            if text:
                docs.append(Document(f"module:{dotted}", text))
    return tuple(sorted(docs, key=lambda d: d.name))


def load_corpus(size: str = "default") -> dict[str, list[Document]]:
    """``{'train': [...], 'validation': [...]}``: documents by :func:`split_of`, sorted by name."""
    out: dict[str, list[Document]] = {"train": [], "validation": []}
    for d in documents(size):
        out[split_of(d.name)].append(d)
    return out


def corpus_hash(size: str = "default") -> str:
    """sha256 (12 hex) of every document's name and text: changes with the Python installation."""
    h = hashlib.sha256()
    for d in documents(size):
        h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:12]
