"""Crafted hostile files, each a builder ``(tmp) -> (argv, pattern)`` for the CLI corpus test.

Every builder writes its inputs under ``tmp`` and returns the ``nnsqueeze`` arguments that read
them and a regex the error message must match. Shared by ``test_cli_corpus.py``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

MODEL = "import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n"


def _compress(tmp: Path, recipe: Path | str, weights: Path | None = None) -> list[str]:
    (tmp / "tiny_model.py").write_text(MODEL)
    argv = ["compress", "--model", f"{tmp / 'tiny_model.py'}:build", "--recipe", str(recipe),
            "--data", "mnist1d", "--out", str(tmp / "out")]
    return argv + (["--weights", str(weights)] if weights is not None else [])


def _recipe(tmp: Path, text: str | bytes, name: str = "r.yaml") -> list[str]:
    p = tmp / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return _compress(tmp, p)


def _laughs(tmp):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    return _recipe(tmp, "\n".join(lines) + "\nsteps: *a8\n"), "expands to more than"


def _aliases(tmp):
    return _recipe(tmp, "x: &x 1\nsteps: [" + ", ".join(["*x"] * 101) + "]\n"), "more than 100 YAML aliases"


def _special(tmp: Path, name: str, kind: str) -> Path:
    p = tmp / name
    if kind == "zero":
        os.symlink("/dev/zero", p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    elif kind == "sparse":
        with open(p, "wb") as f:
            f.truncate(200 << 20)  # 200 MiB of holes: over the recipe and JSON limits, no disk used
    return p


def _sparse_tensor(tmp):
    """A header claiming a 2**40-element tensor, in a 64 MiB sparse file: offsets lie past the end."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}).encode()
    p = tmp / "art" / "model.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(64 << 20)
    return "outside the"


def _st(header: dict, data: bytes = b"", n: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _artifact(tmp: Path, weights: bytes | str | None = None, manifest: str | None = None,
              report: str | None = None, cmd: str = "plot") -> list[str]:
    art = tmp / "art"
    art.mkdir()
    for name, value, default in (("nnsqueeze.json", manifest, '{"format_version": 1, "steps": []}'),
                                 ("report.json", report, '{"layers": {}}'),
                                 ("model.safetensors", weights, b"")):
        if value in ("zero", "fifo", "dir", "sparse"):
            _special(art, name, value)
        else:
            value = default if value is None else value
            (art / name).write_bytes(value if isinstance(value, bytes) else value.encode())
    return [cmd, str(art)]


def _weights(tmp: Path, name: str, obj=None, kind: str | None = None) -> list[str]:
    p = tmp / name
    if kind:
        _special(tmp, name, kind)
    else:
        torch.save(obj, p)
    return _compress(tmp, "int8", weights=p)


DATA = ("import torch\n\n"
        "def endless():\n"
        "    b = (torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))\n"
        "    while True:  # the same batch object: the bound is what stops it, not memory\n"
        "        yield b\n\n"
        "def load():\n"
        "    return {'calib': endless(), 'eval': [(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))]}\n\n"
        "def nan():\n"
        "    x = torch.zeros(8, 4)\n"
        "    x[3, 1] = float('nan')\n"
        "    return {'calib': [(torch.zeros(8, 4), None), (x, None)]}\n")


def _data_case(tmp: Path, factory: str) -> list[str]:
    (tmp / "tiny_data.py").write_text(DATA)
    argv = _compress(tmp, "int8")
    argv[argv.index("mnist1d")] = f"{tmp / 'tiny_data.py'}:{factory}"
    return argv


def _out_link(tmp: Path, target: str) -> list[str]:
    """--out a symlink: to someone else's non-empty directory, or dangling."""
    if target == "foreign":
        (tmp / "elsewhere").mkdir()
        (tmp / "elsewhere" / "thesis.tex").write_text("years of work")
    os.symlink(tmp / ("elsewhere" if target == "foreign" else "nowhere"), tmp / "link")
    argv = _compress(tmp, "int8")
    argv[argv.index("--out") + 1] = str(tmp / "link")
    return argv + ["--overwrite"] if target == "dangling" else argv


def _st_weights(tmp: Path, tensors: dict) -> list[str]:
    """A well-formed safetensors --weights file whose tensors do not match the model's state dict."""
    from safetensors.torch import save_file

    save_file(tensors, tmp / "w.safetensors")
    return _compress(tmp, "int8", weights=tmp / "w.safetensors")


F32 = struct.pack("<4f", 1, 2, 3, 4)
DEEP_JSON = '{"format_version": 1, "steps": [], "x": ' + "[" * 5000 + "]" * 5000 + "}"

CASES = {
    # recipes
    "billion-laughs": _laughs,
    "too-many-aliases": _aliases,
    "alias-cycle": lambda t: (_recipe(t, "steps: &x [*x]\n"), "alias refers to a node containing it"),
    "deep-yaml": lambda t: (_recipe(t, "\n".join(" " * i + f"k{i}:" for i in range(500)) + " 1\n"),
                            "nested more than 64"),
    "deep-json-recipe": lambda t: (_recipe(t, '{"steps": ' + "[" * 5000 + "]" * 5000 + "}", "r.json"), "nested"),
    "duplicate-key": lambda t: (_recipe(t, "steps: [{prune: {}}]\nseed: 1\nseed: 2\n"), "duplicate key 'seed'"),
    "latin1-recipe": lambda t: (_recipe(t, "name: caf\xe9\nsteps: [{prune: {}}]\n".encode("latin-1")), "not UTF-8"),
    "huge-recipe": lambda t: (_compress(t, _special(t, "r.yaml", "sparse")), "over the limit of 1,048,576"),
    "recipe-dev-zero": lambda t: (_compress(t, _special(t, "r.yaml", "zero")), "not a regular file"),
    "recipe-fifo": lambda t: (_compress(t, _special(t, "r.yaml", "fifo")), "not a regular file"),
    "recipe-dir": lambda t: (_compress(t, _special(t, "r.yaml", "dir")), "is a directory"),
    # explicit '? key' syntax: YAML caps implicit keys at 1024 characters
    "long-unknown-key": lambda t: (_recipe(t, f"steps:\n  - cluster:\n      ? {'k' * 20000}\n      : 1\n"),
                                   "unknown key 'kkk"),
    "long-step-name": lambda t: (_recipe(t, f"steps:\n  - ? {'s' * 20000}\n    : {{}}\n"), "unknown step 'sss"),
    "huge-int": lambda t: (_recipe(t, "seed: " + "9" * 5000 + "\nsteps: [{prune: {}}]\n"), "bad value|seed"),
    "binary-recipe": lambda t: (_recipe(t, bytes(range(256)) * 8), "not UTF-8"),
    # safetensors (through `plot`)
    "weights-dev-zero": lambda t: (_artifact(t, weights="zero"), "not a regular file"),
    "weights-fifo": lambda t: (_artifact(t, weights="fifo"), "not a regular file"),
    "weights-sparse-huge-shape": lambda t: (_artifact(t), _sparse_tensor(t)),
    "lying-header-length": lambda t: (_artifact(t, _st({}, n=1 << 60)), "header length"),
    "truncated-weights": lambda t: (_artifact(t, _st({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                                     F32[:7])), "outside the"),
    "unknown-dtype": lambda t: (_artifact(t, _st({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                                                 F32)), "unknown dtype 'F128'"),
    "negative-shape": lambda t: (_artifact(t, _st({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
                                                  F32)), "non-negative"),
    "overlapping-tensors": lambda t: (_artifact(t, _st({
        "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}}, F32)), "overlaps"),
    "size-mismatch": lambda t: (_artifact(t, _st({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
                                                 F32)), "needs 16 bytes"),
    "header-not-json": lambda t: (_artifact(t, struct.pack("<Q", 4) + b"{{{{" + F32), "corrupt"),
    "deep-header": lambda t: (_artifact(t, _st(json.loads("[" * 100 + "]" * 100))), "nested more than 64"),
    # manifests and reports (through `report`)
    "manifest-dev-zero": lambda t: (_artifact(t, manifest="zero", cmd="report"), "not a regular file"),
    "manifest-huge": lambda t: (_artifact(t, manifest="sparse", cmd="report"), "over the limit"),
    "manifest-deep": lambda t: (_artifact(t, manifest=DEEP_JSON, cmd="report"), "nested"),
    "manifest-steps-not-list": lambda t: (_artifact(t, manifest='{"format_version": 1, "steps": 7}', cmd="report"),
                                          "must be a list"),
    "report-wrong-types": lambda t: (_artifact(t, report='{"steps": "x"}', cmd="report"), "corrupt report"),
    "report-row-types": lambda t: (_artifact(t, report='{"skipped": [1]}', cmd="report"), "skipped\\[0\\]"),
    "report-huge-number": lambda t: (_artifact(t, report='{"baseline": {"params": 1' + "0" * 400 + '}}',
                                               cmd="report"), "out of range"),
    "report-deep": lambda t: (_artifact(t, report='{"layers": ' + "[" * 5000 + "]" * 5000 + "}", cmd="report"),
                              "nested"),
    # --weights
    "weights-list": lambda t: (_weights(t, "w.pt", [torch.zeros(2)]), "not a state_dict"),
    "weights-non-tensors": lambda t: (_weights(t, "w.pt", {"weight": 1, "bias": "x"}), "not a state_dict"),
    "weights-pt-dev-zero": lambda t: (_weights(t, "w.pt", kind="zero"), "not a regular file"),
    "weights-st-dev-zero": lambda t: (_weights(t, "w.safetensors", kind="zero"), "not a regular file"),
    # beyond the list
    "recipe-yaml-scalar": lambda t: (_recipe(t, "int8\n"), "a recipe is a mapping with 'steps', got str"),
    "recipe-list-of-lists": lambda t: (_recipe(t, "- [quantize, prune]\n- [1]\n"), r"steps\[0\].*valid dictionary"),
    "recipe-steps-string": lambda t: (_recipe(t, "steps: quantize\n"), "steps.*valid list"),
    "recipe-yaml-tag": lambda t: (_recipe(t, "steps: !!python/object/apply:os.system [echo pwned]\n"),
                                  "malformed YAML|could not determine a constructor"),
    "recipe-empty": lambda t: (_recipe(t, ""), "a recipe is a mapping with 'steps', got NoneType"),
    "recipe-bom-nul": lambda t: (_recipe(t, b"\xef\xbb\xbfsteps: [\x00]\n"), "malformed YAML|special characters"),
    "manifest-step-is-string": lambda t: (_artifact(t, manifest='{"format_version": 1, "steps": ["quantize"]}',
                                                    cmd="report"), r"steps\[0\].*mapping with a string 'name'"),
    "manifest-is-list": lambda t: (_artifact(t, manifest="[1, 2]", cmd="report"), "no integer format_version"),
    "manifest-version-string": lambda t: (_artifact(t, manifest='{"format_version": "1", "steps": []}',
                                                    cmd="report"), "format_version"),
    "weights-other-keys": lambda t: (_st_weights(t, {"encoder.weight": torch.zeros(2, 4), "bias": torch.zeros(2)}),
                                     "does not fit the model"),
    "weights-other-width": lambda t: (_st_weights(t, {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}),
                                      "does not fit the model.*size mismatch"),
    "out-symlink-to-foreign-dir": lambda t: (_out_link(t, "foreign"), "not an nnsqueeze artifact"),
    "out-dangling-symlink": lambda t: (_out_link(t, "dangling"), "exists and is not a directory"),
    "data-endless-generator": lambda t: (_data_case(t, "load"), "yielded more than 100,000 batches"),
    "data-nan-calibration": lambda t: (_data_case(t, "nan"), r"calib_data batch 1: inputs hold NaN"),
}
