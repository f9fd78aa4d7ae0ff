"""nnsqueeze on a model and data it has never seen: an MLP on scikit-learn's digits.

Run:  python examples/quickstart.py [OUT_DIR]
Trains a small MLP (a few seconds), prunes it to 50%, fine-tunes, quantizes to int8, exports a
verified ONNX model, reloads the artifact without pickle, and prints the report.
"""

import sys
import tempfile

import torch
from sklearn.datasets import load_digits
from torch import nn

import nnsqueeze as nsq


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(x, y, size=64):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def main(out: str) -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train, test = batches(x[:1400], y[:1400]), batches(x[1400:], y[1400:], 128)

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):  # a quick baseline
        for xb, yb in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    recipe = [
        {"prune": {"sparsity": 0.5, "scope": "global", "schedule": "gradual"}},
        {"finetune": {"epochs": 5, "lr": 1e-3}},
        {"quantize": {}},
    ]
    result = nsq.compress(model, recipe, train_data=train, calib_data=train[:4], eval_data=test,
                          metric="accuracy", progress=False)
    result.report.print()
    result.save(out)

    restored = nsq.load(out, model=make_model())  # no pickle: structure replayed, tensors loaded
    xb = test[0][0]
    assert torch.equal(restored(xb), result.model.eval()(xb))
    print(f"artifact in {out}; reloaded model reproduces the compressed outputs exactly")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="nnsqueeze-quickstart-"))
