"""Small models, one per coupling pattern the structured-pruning graph claims to handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualCNN(nn.Module):
    """Residual add with identity shortcut, a 1x1-conv downsample shortcut, GAP -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = torch.relu(self.b2(x) + self.down(x))
        return self.fc(x.mean((2, 3)))


class ConcatSplit(nn.Module):
    """Two branches concatenated along channels (twice, at different offsets); a chunk inside one conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 6, 3, padding=1)
        self.b = nn.Conv1d(2, 10, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.mix = nn.Conv1d(16, 8, 1)
        self.c = nn.Conv1d(8, 12, 1)       # its output is chunked: split sizes are fixed, left intact
        self.d = nn.Conv1d(6, 4, 1)
        self.head = nn.Linear(4 + 16, 3)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        g1, g2 = self.c(F.relu(self.mix(y))).chunk(2, dim=1)
        z = self.d(g1 * torch.sigmoid(g2))
        return self.head(torch.cat([z.mean(2), y.mean(2)], 1))


class DepthwiseGrouped(nn.Module):
    """Depthwise-separable block (pruned through) and a grouped conv (left intact, reported)."""

    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.pw2 = nn.Conv2d(16, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.bn2(self.dw(F.relu(self.bn1(self.pw1(x))))))
        x = F.relu(self.grouped(F.relu(self.pw2(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Norms(nn.Module):
    """GroupNorm after a conv (left intact), BatchNorm (pruned), LayerNorm over features (left intact)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv1d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm1d(12)
        self.fc1 = nn.Linear(12 * 10, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.c2(F.relu(self.gn(self.c1(x))))))
        return self.fc2(self.ln(F.relu(self.fc1(x.flatten(1)))))


class TransformerBlock(nn.Module):
    """Pre-LN block: nn.MultiheadAttention (reported, intact) and an FFN whose hidden neurons are pruned."""

    def __init__(self, d: int = 16, heads: int = 4, hidden: int = 40, vocab: int = 30):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(h.mean(1))


class Tied(nn.Module):
    """Embedding tied to the output projection: the shared dimension is left intact."""

    def __init__(self, vocab: int = 20, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, 24)
        self.back = nn.Linear(24, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.back(torch.relu(self.mid(self.emb(ids)))))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


class InvertedResidualSE(nn.Module):
    """MobileNet-style: expand 1x1, depthwise 3x3, squeeze-excite (mul by a broadcast gate), project, add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU6())
        self.se1, self.se2 = nn.Linear(24, 6), nn.Linear(6, 24)
        self.se_conv = nn.Conv2d(24, 24, 1)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(self.expand(x))
        gate = torch.sigmoid(self.se2(F.relu(self.se1(h.mean((2, 3))))))
        h = h * gate[:, :, None, None] + self.se_conv(h) * gate.unsqueeze(-1).unsqueeze(-1)
        x = x + self.project(h)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResNeXtGN(nn.Module):
    """Residual bottleneck with a grouped 3x3 conv (groups=4) and GroupNorm(4) on the stream."""

    def __init__(self):
        super().__init__()
        self.stem, self.gn0 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.reduce, self.bn1 = nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24)
        self.grouped, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.expand, self.gn3 = nn.Conv2d(24, 16, 1), nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.gn0(self.stem(x)))
        h = torch.relu(self.bn2(self.grouped(torch.relu(self.bn1(self.reduce(x))))))
        x = torch.relu(x + self.gn3(self.expand(h)))
        return self.fc(x.mean((2, 3)))
