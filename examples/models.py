"""Example LightningModules to copy: a digits ConvNet and a DAWNBench-shaped ResNet-9.

Both share :class:`ClassifierModule` (cross-entropy, torchmetrics accuracy, a choice of torch
optimizer), so the only thing a subclass writes is its network in :meth:`build_net`.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from pl_optim.checks import positive

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")


def _check_widths(name: str, widths: Sequence[int], count: int) -> tuple[int, ...]:
    widths = tuple(widths)
    if len(widths) != count or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"`{name}` must be {count} positive integers, got {widths!r}")
    return widths


class ClassifierModule(pl.LightningModule):
    """Image classifier base: cross-entropy loss, accuracy, and a torch optimizer picked by name.

    Args:
        optimizer: one of ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``.
        lr: learning rate.
        momentum: SGD/RMSprop momentum (ignored by the Adam family, which uses ``betas``).
        betas: Adam-family ``(beta1, beta2)``.
        weight_decay: the optimizer's own (coupled) weight decay.
        num_classes: number of classes.

    Raises:
        ValueError: an unknown optimizer name or a bad number.
    """

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
        positive("lr", lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        self.save_hyperparameters()
        self.net = self.build_net()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)

    def build_net(self) -> nn.Module:
        """Return the network; subclasses override this."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return torch.optim.Adagrad(params, lr=hp.lr, weight_decay=hp.weight_decay)


def conv_bn(c_in: int, c_out: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias: BatchNorm supplies the shift) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=False),
    )


class DigitsConvNet(ClassifierModule):
    """ConvNet for 8x8 digits: three conv-BN-ReLU blocks, two max-pools, Flatten -> Linear.

    Wide enough (tens of channels a layer) that self-compression has something to remove.

    Args:
        channels: widths of the three conv blocks.
        in_channels: image channels (1 for digits).
        **kwargs: optimizer settings of :class:`ClassifierModule`.

    Example::

        trainer.fit(DigitsConvNet(channels=(32, 64, 64), lr=3e-3), datamodule=DigitsDataModule())
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64), in_channels: int = 1, **kwargs) -> None:
        self.channels = _check_widths("channels", channels, 3)
        self.in_channels = _check_widths("in_channels", (in_channels,), 1)[0]
        super().__init__(**kwargs)

    def build_net(self) -> nn.Module:
        c1, c2, c3 = self.channels
        return nn.Sequential(
            conv_bn(self.in_channels, c1),
            conv_bn(c1, c2),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            conv_bn(c2, c3),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(c3 * 2 * 2, self.hparams.num_classes),
        )


class Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Scale(nn.Module):
    """Multiply by a constant (Page's ResNet-9 scales the logits by 0.125)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class ResNet9(ClassifierModule):
    """David Page's DAWNBench ResNet-9 shape: prep conv, three layers (the first and last with a
    residual block of two conv-BN-ReLU), global max-pool, linear head scaled by 0.125.

    ``widths`` default to Page's (64, 128, 256, 512); pass smaller ones for CPU runs. Runs on the
    8x8 digits (``in_channels=1``) and on 32x32 CIFAR-10 (``in_channels=3``, see
    :class:`examples.data.CIFAR10DataModule`).

    Args:
        widths: channels of prep, layer1, layer2, layer3.
        in_channels: image channels.
        **kwargs: optimizer settings of :class:`ClassifierModule`.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), in_channels: int = 3, **kwargs) -> None:
        self.widths = _check_widths("widths", widths, 4)
        self.in_channels = _check_widths("in_channels", (in_channels,), 1)[0]
        super().__init__(**kwargs)

    def build_net(self) -> nn.Module:
        w0, w1, w2, w3 = self.widths
        return nn.Sequential(
            conv_bn(self.in_channels, w0),
            nn.Sequential(conv_bn(w0, w1), nn.MaxPool2d(2), Residual(nn.Sequential(conv_bn(w1, w1), conv_bn(w1, w1)))),
            nn.Sequential(conv_bn(w1, w2), nn.MaxPool2d(2)),
            nn.Sequential(conv_bn(w2, w3), nn.MaxPool2d(2), Residual(nn.Sequential(conv_bn(w3, w3), conv_bn(w3, w3)))),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(w3, self.hparams.num_classes, bias=False),
            Scale(0.125),
        )
