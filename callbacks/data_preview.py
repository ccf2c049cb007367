"""DataPreview: a PNG of the first training batch exactly as the net receives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from pl_optim import checks
from pl_optim.recipe import split_batch
from pl_optim.recipe.plots import is_image_batch, save_batch_preview


def output_path(trainer: Trainer, dirpath: str, filename: str) -> Path:
    """``dirpath/filename``, relative paths under ``trainer.default_root_dir``."""
    base = Path(dirpath)
    return (base if base.is_absolute() else Path(trainer.default_root_dir) / base) / filename


class DataPreview(Callback):
    """Save the first training batch "just before the net" (Karpathy): after
    ``transfer_batch_to_device`` and ``on_after_batch_transfer`` (augmentation, normalisation),
    at ``on_train_batch_start`` of batch 0 of a fit starting at step 0, on rank 0. Image batches
    (``(N, H, W)`` or ``(N, C, H, W)`` with 1/3/4 channels) become a grid titled with the
    targets, each image min-max scaled; other inputs a heat map of samples x features. The path
    is reported with ``rank_zero_info`` and, with a ``WandbLogger``, logged as an image
    (key ``data_preview``).

    Args:
        num_samples: images in the grid (>= 1).
        dirpath: folder of the PNG (relative: under ``trainer.default_root_dir``).
        filename: the PNG's name.
        input_key: where the inputs are in the batch (index or dict key).
        target_key: where the targets are.

    Raises:
        ValueError: a bad argument; at the first batch, a batch without tensor inputs/targets.

    Example::

        Trainer(callbacks=[DataPreview(num_samples=32)])   # -> <default_root_dir>/recipe/data_preview.png
    """

    def __init__(self, num_samples: int = 32, dirpath: str = "recipe", filename: str = "data_preview.png",
                 input_key: str | int | None = None, target_key: str | int | None = None) -> None:
        self.num_samples = checks.integer("num_samples", num_samples, minimum=1)
        if not isinstance(dirpath, str) or not isinstance(filename, str) or not filename.endswith(".png"):
            raise ValueError(f"`dirpath` must be a folder and `filename` a .png name, got {dirpath!r}, {filename!r}")
        self.dirpath, self.filename = dirpath, filename
        self.input_key, self.target_key = input_key, target_key
        self.saved: Path | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.saved is not None or batch_idx != 0 or trainer.global_step != 0 or not trainer.is_global_zero:
            return
        x, y = split_batch(batch, self.input_key, self.target_key)
        x, y = x[: self.num_samples], y[: self.num_samples]
        titles = [str(v.item()) if v.numel() == 1 else "" for v in y] if y.ndim <= 1 else None
        stats = f"inputs {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}, mean {float(x.float().mean()):.3g}, " \
                f"std {float(x.float().std()):.3g}, range [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        self.saved = save_batch_preview(x, output_path(trainer, self.dirpath, self.filename), titles=titles, suptitle=stats)
        kind = "image grid" if is_image_batch(x) else "heat map"
        rank_zero_info(f"DataPreview: {stats}; {kind}: {self.saved or 'not saved (matplotlib missing)'}")
        if self.saved is not None:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="data_preview", images=[str(self.saved)])
