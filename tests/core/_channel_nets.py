"""Small handcrafted networks for the channel-removal tests (concat, depthwise, unsupported ops)."""

from __future__ import annotations

import torch
from torch import nn

from examples.models import DigitsConvNet, ResNet9


class ConcatNet(nn.Module):
    """Two conv-BN-ReLU branches concatenated on channels, then a conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(11, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(7 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(torch.flatten(self.c(y), 1))


class DepthwiseNet(nn.Module):
    """Conv -> BN -> ReLU -> depthwise conv -> BN -> ReLU -> 1x1 conv -> global pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(1, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.pw1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.pw2(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class GatedNet(nn.Module):
    """Unsupported on purpose: a channel slice and a tensor-by-tensor product."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.c4 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.c1(x)[:, :3])
        z = self.c3(y) * torch.sigmoid(y)
        return self.head(self.c4(z).flatten(1))


def nets() -> dict[str, nn.Module]:
    """Name -> fresh network taking ``[N, 1, 8, 8]`` inputs."""
    return {
        "digits": DigitsConvNet(channels=(8, 8, 8)).net,
        "resnet9": ResNet9(widths=(8, 8, 8, 8), in_channels=1).net,
        "concat": ConcatNet(),
        "depthwise": DepthwiseNet(),
    }


def kill(graph, channels: list[int], shift: float = -1.0) -> None:
    """Make ``channels`` dead in every producer of every unfrozen group of ``graph``: zero weight
    rows and bias, BatchNorm shift ``shift`` and running mean 0 (so ReLU removes it when < 0)."""
    with torch.no_grad():
        for g in graph.groups:
            if g.frozen:
                continue
            for p in g.producers:
                mod = graph.modules[p]
                mod.weight[channels] = 0
                if mod.bias is not None:
                    mod.bias[channels] = 0
            for c in g.channelwise:
                mod = graph.modules[c]
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.bias[channels] = shift
                    mod.running_mean[channels] = 0
