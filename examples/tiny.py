"""Generated-data tiny modules for tests: a few hundred parameters, no files, deterministic."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.models import ClassifierModule, conv_bn


class RandomClassificationData(pl.LightningDataModule):
    """Gaussian inputs labelled by a fixed random linear teacher (learnable, deterministic).

    Args:
        n: number of samples (the same set serves train and val).
        shape: shape of one input, e.g. ``(8,)`` for vectors or ``(1, 8, 8)`` for images.
        num_classes: number of classes.
        batch_size: samples per batch.
        seed: generator seed.
    """

    def __init__(self, n: int = 256, shape: tuple[int, ...] = (8,), num_classes: int = 3, batch_size: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=g)
        teacher = torch.randn(self.x[0].numel(), num_classes, generator=g)
        self.y = (self.x.flatten(1) @ teacher).argmax(1)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x))


class TinyClassifier(ClassifierModule):
    """MLP ``features -> hidden -> num_classes`` (8*16+16 + 16*3+3 = 195 parameters by default)."""

    def __init__(self, features: int = 8, hidden: int = 16, num_classes: int = 3, **kwargs) -> None:
        self.features, self.hidden = features, hidden
        super().__init__(num_classes=num_classes, **kwargs)

    def build_net(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.features, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hparams.num_classes))


class TinyConvNet(ClassifierModule):
    """Two conv-BN-ReLU blocks, max-pool, Flatten -> Linear, on ``(1, 8, 8)`` inputs."""

    def __init__(self, channels: tuple[int, int] = (8, 8), num_classes: int = 3, **kwargs) -> None:
        self.channels = tuple(channels)
        super().__init__(num_classes=num_classes, **kwargs)

    def build_net(self) -> nn.Module:
        c1, c2 = self.channels
        return nn.Sequential(
            conv_bn(1, c1), conv_bn(c1, c2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, self.hparams.num_classes)
        )
