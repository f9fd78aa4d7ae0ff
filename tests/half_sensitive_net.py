"""A tiny MLP whose fc1 alone is deliberately sensitive to fp16 and bf16 (half-step tests).

fc1's outputs all carry a common offset of 7e4 on top of a signal of magnitude ~500; the
LayerNorm after it removes the offset in fp32, so the fp32 function is a plain well-scaled MLP.
In fp16 the offset overflows (max 65504 -> inf -> NaN after the LayerNorm); in bf16 the spacing
of representable numbers near 7e4 is 512, so the signal is rounded away. fc0 and fc2 see and
produce ordinary magnitudes and only lose half-precision rounding. Also written out as a CLI
factory file.
"""

import torch
from torch import nn

OFFSET = 7.0e4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(12, 16)
        self.fc1 = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(torch.relu(self.fc0(x)))))


def build():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.fc1.weight.mul_(3000.0)
        m.fc1.bias.add_(OFFSET)
        m.fc2.weight.mul_(3.0)
    return m.eval()


def data():
    g = torch.Generator().manual_seed(1)
    model = build()

    def batches(n, bs):
        out = []
        for _ in range(n):
            x = torch.randn(bs, 12, generator=g)
            with torch.no_grad():
                y = model(x).argmax(-1)  # labels = the fp32 predictions: baseline accuracy 1.0
            out.append((x, y))
        return out

    return {"calib": batches(2, 32), "eval": batches(2, 64)}
