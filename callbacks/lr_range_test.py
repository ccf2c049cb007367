"""LRRangeTest: sweep the lr before training, restore everything, suggest a max_lr."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric

from pl_optim.lr_range_test import SUGGESTIONS, RangeTestResult, check_range_args, lr_range_test


class LRRangeTest(Callback):
    r"""LR range test (Smith; fastai ``lr_find``) run at ``on_train_start`` on the real model,
    optimizer and training data, then undone bit for bit (weights, buffers, gradients, optimizer
    state and param groups, torch RNG; torchmetrics states are reset and ``self.log`` calls are
    dropped during the sweep). The training that follows is the one you would get without it.

    The lr of param group 0 goes exponentially from ``min_lr`` to ``max_lr`` over ``num_steps``
    batches (other groups keep their ratio to group 0); the bias-corrected smoothed loss stops the
    sweep at divergence (see :func:`pl_optim.lr_range_test.lr_range_test`). The suggestion
    (``result.suggestions()``, one lr per param group) feeds :class:`~pl_optim.callbacks.OneCycle`
    with ``OneCycle(max_lr="find")``. Under DDP each rank sweeps its own shard without gradient
    sync; rank 0's suggestion is broadcast. A resumed run does not sweep again. Each sweep step is
    one batch (no gradient accumulation, no gradient clipping) and the optimizer's step hooks are
    suspended meanwhile, so schedulers and decoupled weight decay never see the sweep.

    Args:
        min_lr: first lr (group 0).
        max_lr: last lr (group 0).
        num_steps: batches of the sweep (the train dataloader is cycled if shorter).
        smoothing: :math:`\beta` of the smoothed loss.
        diverge_threshold: stop when the smoothed loss exceeds this multiple of its minimum.
        suggestion: ``"min_div_10"`` (lr at the minimum / 10, fastai's rule) or ``"steepest"``.
        optimizer: index of the optimizer to sweep.
        plot_path: where to save the loss-vs-lr PNG (relative paths go under
            ``trainer.default_root_dir``); ``None`` for no plot. Needs matplotlib.

    Raises:
        ValueError: a bad argument; manual optimization (the sweep drives the optimizer itself).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[LRRangeTest(), OneCycle(max_lr="find")])
        trainer.fit(model, datamodule=dm)
        trainer.callbacks[0].suggested  # the max_lr OneCycle used, per param group
    """

    def __init__(
        self,
        min_lr: float = 1e-7,
        max_lr: float = 10.0,
        num_steps: int = 100,
        smoothing: float = 0.98,
        diverge_threshold: float = 4.0,
        suggestion: str = "min_div_10",
        optimizer: int = 0,
        plot_path: str | None = "lr_range_test.png",
    ) -> None:
        check_range_args(min_lr, max_lr, num_steps, smoothing, diverge_threshold)
        if suggestion not in SUGGESTIONS:
            raise ValueError(f"`suggestion` must be one of {SUGGESTIONS}, got {suggestion!r}")
        if isinstance(optimizer, bool) or not isinstance(optimizer, int) or optimizer < 0:
            raise ValueError(f"`optimizer` must be an optimizer index >= 0, got {optimizer!r}")
        self.kwargs = dict(min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, smoothing=smoothing,
                           diverge_threshold=diverge_threshold)
        self.suggestion, self.optimizer, self.plot_path = suggestion, optimizer, plot_path
        self.result: RangeTestResult | None = None
        self.suggested: list[float] | None = None  # per param group, after the sweep (or restored)
        self.saved_plot: Path | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.suggested is None and trainer.global_step == 0:
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> list[float]:
        """Sweep now (once) and return the suggested lr of every param group."""
        if self.suggested is not None:
            return self.suggested
        if not pl_module.automatic_optimization:
            raise ValueError("LRRangeTest supports automatic optimization only (the sweep steps the optimizer itself)")
        if self.optimizer >= len(trainer.optimizers):
            raise ValueError(f"`optimizer` is {self.optimizer} but the model configures {len(trainer.optimizers)} optimizer(s)")
        opt = trainer.optimizers[self.optimizer]
        batches = itertools.cycle(trainer.train_dataloader)
        pl_module.log = pl_module.log_dict = lambda *a, **k: None  # the sweep is not training
        try:
            self.result = lr_range_test(lambda k: self._loss(trainer, pl_module, next(batches), k), opt, [pl_module], **self.kwargs)
        finally:
            del pl_module.log, pl_module.log_dict  # back to the class methods
        for m in pl_module.modules():
            if isinstance(m, Metric):
                m.reset()
        self.suggested = [float(v) for v in trainer.strategy.broadcast(self.result.suggestions(self.suggestion), src=0)]
        if trainer.is_global_zero and self.plot_path is not None:
            path = Path(self.plot_path)
            self.saved_plot = self.result.plot(path if path.is_absolute() else Path(trainer.default_root_dir) / path, self.suggestion)
        rank_zero_info(
            f"LRRangeTest: {len(self.result.lrs)} steps up to lr {self.result.lrs[-1]:.3g}"
            f"{' (diverged)' if self.result.diverged else ''}; suggested lr per param group: "
            f"{[float(f'{v:.4g}') for v in self.suggested]}" + (f"; plot: {self.saved_plot}" if self.saved_plot else "")
        )
        return self.suggested

    @staticmethod
    def _loss(trainer: Trainer, pl_module: LightningModule, batch: Any, k: int) -> torch.Tensor:
        batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))  # as the fit loop does
        with trainer.precision_plugin.train_step_context():
            out = pl_module.training_step(batch, k)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"LRRangeTest needs training_step to return the loss (a tensor or {{'loss': ...}}), got {out!r}")
        return loss

    def suggestion_for(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> list[float]:
        """The suggestion for ``optimizer`` (sweeping first if needed) — used by ``OneCycle("find")``."""
        if trainer.optimizers.index(optimizer) != self.optimizer:
            raise ValueError(
                f"OneCycle(max_lr='find') on optimizer {trainer.optimizers.index(optimizer)}, but LRRangeTest sweeps "
                f"optimizer {self.optimizer}; set LRRangeTest(optimizer=...) to match"
            )
        return self.run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.suggested is None else {"suggested": list(self.suggested)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "suggested" in state_dict:
            self.suggested = [float(v) for v in state_dict["suggested"]]
