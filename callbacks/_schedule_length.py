"""How many optimizer steps a Lightning run will make (the length of a schedule)."""

from __future__ import annotations

import math

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler


def derive_total_steps(trainer: Trainer, n_optimizers: int = 1) -> int:
    """Optimizer steps the run will make, per optimizer, from the Trainer's configuration.

    ``trainer.estimated_stepping_batches`` covers ``max_steps``, ``max_epochs``,
    ``limit_train_batches``, ``accumulate_grad_batches`` and devices (the batch count is per
    rank). A :class:`~lightning.pytorch.callbacks.GradientAccumulationScheduler` varies the
    accumulation per epoch: then ``sum_e ceil(batches / accumulation(e))``, capped by
    ``max_steps``. Under manual optimization ``global_step`` counts the steps of *all*
    optimizers; each optimizer is assumed to step once per batch.

    Raises:
        ValueError: the run is unbounded (``max_epochs=-1`` and ``max_steps=-1``, or an
            iterable dataset without ``max_steps``).
    """
    manual = not trainer.lightning_module.automatic_optimization
    gas = next((cb for cb in trainer.callbacks if isinstance(cb, GradientAccumulationScheduler)), None)
    batches, max_steps = trainer.num_training_batches, trainer.max_steps
    if manual and max_steps != -1:
        max_steps = max_steps // n_optimizers
    if trainer.max_epochs == -1 or batches == float("inf"):
        total: float = float("inf") if max_steps == -1 else max_steps
    elif gas is not None or manual:
        epochs = max(trainer.max_epochs or 1, 1)
        acc = (lambda e: 1) if manual else gas.get_accumulate_grad_batches
        total = sum(math.ceil(batches / acc(e)) for e in range(epochs))
        total = min(total, max_steps) if max_steps != -1 else total
    else:
        total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 1:
        raise ValueError(
            f"cannot derive the schedule length from the Trainer (got {total}): set `max_steps` or "
            "`max_epochs` with a sized train dataloader, or pass `total_steps=`"
        )
    return int(total)
