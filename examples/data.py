"""Example datamodules. Nothing here downloads unless the user explicitly asks.

* :class:`DigitsDataModule`: sklearn's embedded 8x8 digits (1,797 images, 10 classes).
* :class:`CIFAR10DataModule`: CIFAR-10 from a local folder (torchvision's layout).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def _fraction(name: str, value: float) -> float:
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
    return float(value)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as ``(N, 1, 8, 8)`` float32 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    return x, y


class DigitsDataModule(pl.LightningDataModule):
    """sklearn's embedded digits: 1,797 grey 8x8 images, 10 classes, never downloaded.

    The train/val split is a fixed permutation drawn from ``seed``, so it is the same on every
    machine and every rank. Inputs are standardised with the training-set mean and std.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the images held out for validation, in (0, 1).
        seed: seed of the split permutation.
        num_workers: DataLoader workers (0 is fastest for this tiny set).

    Example::

        dm = DigitsDataModule(batch_size=64)
        trainer.fit(DigitsConvNet(), datamodule=dm)
    """

    num_classes = 10
    in_channels = 1

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.val_fraction = _fraction("val_fraction", val_fraction)
        self.seed = int(seed)
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(x) * self.val_fraction))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        mean, std = x[train_idx].mean(), x[train_idx].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512, num_workers=self.num_workers)


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from a local folder (torchvision's ``cifar-10-batches-py`` layout).

    Needs the optional extra ``pip install "pl-optim[vision]"`` (torchvision). Never downloads
    unless ``download=True`` is passed explicitly.

    Args:
        data_dir: folder that holds (or will hold, with ``download=True``) ``cifar-10-batches-py``.
        batch_size: samples per batch.
        download: let torchvision download the data set into ``data_dir``.
        num_workers: DataLoader workers.

    Raises:
        FileNotFoundError: ``data_dir`` does not hold CIFAR-10 and ``download`` is False.
        ImportError: torchvision is not installed.
    """

    num_classes = 10
    in_channels = 3
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2471, 0.2435, 0.2616)

    def __init__(self, data_dir: str, batch_size: int = 512, download: bool = False, num_workers: int = 2):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.download = bool(download)
        self.num_workers = num_workers
        if not self.download and not (self.data_dir / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"`data_dir` {str(self.data_dir)!r} does not contain 'cifar-10-batches-py'; point it at a "
                "local CIFAR-10 copy or pass download=True"
            )

    def _dataset(self, train: bool):
        try:
            import torchvision
            from torchvision import transforms as T
        except ImportError as err:  # pragma: no cover - depends on the optional extra
            raise ImportError('CIFAR10DataModule needs torchvision: pip install "pl-optim[vision]"') from err
        aug = [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()] if train else []
        tf = T.Compose([*aug, T.ToTensor(), T.Normalize(self.mean, self.std)])
        return torchvision.datasets.CIFAR10(str(self.data_dir), train=train, transform=tf, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset(train=True)
        self.val_set = self._dataset(train=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024, num_workers=self.num_workers)
