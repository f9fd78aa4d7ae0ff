"""A tiny CNN whose fc2 is deliberately sensitive to int8 (shared by the sensitivity and mixed tests).

fc1's output channel 0 is scaled up 200x and fc2's matching input column down 200x (ReLU in
between: the fp32 function is unchanged), so fc2's per-tensor input quantizer must cover one huge
channel and the 15 others lose their resolution. Also written out as a CLI factory file.
"""

import torch
import torch.nn.functional as F
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 16, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

def build():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.fc1.weight[0] *= 200.0
        m.fc1.bias[0] *= 200.0
        m.fc2.weight.mul_(5.0)  # logits driven by the inputs rather than the biases
        m.fc2.weight[:, 0] /= 200.0
    return m.eval()

def data():
    g = torch.Generator().manual_seed(1)
    model = build()
    def batches(n, bs):
        out = []
        for _ in range(n):
            x = torch.randn(bs, 1, 32, generator=g)
            with torch.no_grad():
                y = model(x).argmax(-1)  # labels = the fp32 predictions: baseline accuracy 1.0
            out.append((x, y))
        return out
    return {"calib": batches(2, 32), "eval": batches(2, 64)}
