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


class SENet(nn.Module):
    """Conv-BN-ReLU, then a squeeze-excitation gate multiplying the same channels, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * gate).mean((2, 3))


class DenseCatNet(nn.Module):
    """DenseNet's pattern: two feature maps concatenated, then BatchNorm over the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        y = torch.relu(self.norm(torch.cat([a, self.b(a)], 1)))
        return self.out(y).mean((2, 3))


class GroupedNet(nn.Module):
    """RegNet's bottleneck: 1x1 conv, grouped 3x3 conv (4 groups of 2), 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x))).mean((2, 3))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's MLP: permute to channels-last, Linear -> GELU -> Linear, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).permute(0, 2, 3, 1)
        return self.fc2(nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2).mean((2, 3))


def nets() -> dict[str, nn.Module]:
    """Name -> fresh network taking ``[N, 1, 8, 8]`` inputs."""
    return {
        "digits": DigitsConvNet(channels=(8, 8, 8)).net,
        "resnet9": ResNet9(widths=(8, 8, 8, 8), in_channels=1).net,
        "concat": ConcatNet(),
        "depthwise": DepthwiseNet(),
    }


def kill(graph, channels: list[int], shift: float = -1.0, only: tuple[str, ...] | None = None) -> None:
    """Make ``channels`` dead in every producer of every unfrozen group of ``graph``: zero weight
    rows and bias, BatchNorm shift ``shift`` and running mean 0 (so ReLU removes it when < 0).
    ``only``: just the groups of these producers."""
    with torch.no_grad():
        for g in graph.groups:
            if g.frozen or only is not None and not set(only) & set(g.producers):
                continue
            for p in g.producers:
                mod = graph.modules[p]
                mod.weight[channels] = 0
                if mod.bias is not None:
                    mod.bias[channels] = 0
            gi = graph.groups.index(g)
            for c in g.channelwise:
                mod = graph.modules[c]
                pos = graph.positions(c, gi)[:, channels].flatten()  # after a concatenation: its segment
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.bias[pos] = shift
                    mod.running_mean[pos] = 0
