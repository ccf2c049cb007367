"""RecipeChecks: Karpathy's checks on the first training batch, as one checklist table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from pl_optim import checks as argcheck
from pl_optim.recipe import CHECKS, RecipeReport, resolve_loss, run_recipe
from pl_optim.recipe.core import _check_optimizer, validate_options
from pl_optim.recipe.report import COLUMNS


class RecipeChecks(Callback):
    r"""Run the recipe checks of :mod:`pl_optim.recipe` on the first training batch of a fit.

    At ``on_train_batch_start`` of batch 0 of a fit that starts at step 0 (a resumed run does
    not check again), with the batch as the net receives it (after ``transfer_batch_to_device``
    and ``on_after_batch_transfer``), under the precision plugin's autocast: the loss at init,
    the final bias, an input-independent baseline, overfitting the batch, batch independence,
    gradient flow and dead ReLUs. The checks call ``pl_module(inputs)`` and ``loss(output,
    targets)`` on a clone: the model, its optimizers, the RNG and the training that follows are
    those of a run without this callback. The table (check, status, value, expected, the fix to
    try) is printed through ``rank_zero_info``, each value and status is logged to every logger
    (``recipe/<check>``, ``recipe/<check>_status``: 0 pass/skip, 1 warn, 2 fail) and, with a
    ``WandbLogger``, the table as a ``wandb.Table`` (key ``recipe_checks``).

    Under DDP every rank checks its own first batch (so SyncBatchNorm-free models run the same
    code on all ranks); rank 0 reports, and rank 0's verdict decides ``raise_on_failure`` on
    every rank. Gradient accumulation and manual optimization change nothing (the checks train
    their own clones).

    Args:
        loss: ``"cross_entropy"``, ``"bce_with_logits"``, ``"mse"``, ``"l1"``, ``"smooth_l1"``,
            ``"huber"``, a torch loss function/module, or any callable with ``task``.
        task: ``"classification"``, ``"binary"`` or ``"regression"`` (needed for a custom loss).
        checks: names of the checks to run (default: all, in the order above).
        options: check name -> its keyword arguments, e.g. ``{"overfit_batch": {"steps": 50}}``.
        optimizer: what trains the clones: an Adam lr, ``"user"`` (a copy of the model's first
            optimizer, with its current param-group values) or a callable ``params -> optimizer``.
        input_key: where the inputs are in the batch (index or dict key; default 0 / a usual key).
        target_key: where the targets are (default 1 / a usual key).
        raise_on_failure: raise ``RuntimeError`` (before the first training step) when a check fails.
        seed: seed of the checks' own RNG (the global RNG is restored afterwards).

    Raises:
        ValueError: a bad argument (unknown check or loss, non-positive threshold, ...).
        RuntimeError: with ``raise_on_failure``, when a check fails.

    Example::

        trainer = Trainer(callbacks=[RecipeChecks(options={"overfit_batch": {"steps": 50}})])
    """

    def __init__(
        self,
        loss: str | Callable[..., torch.Tensor] = "cross_entropy",
        task: str | None = None,
        checks: Sequence[str] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        optimizer: Any = 3e-3,
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        raise_on_failure: bool = False,
        seed: int = 0,
    ) -> None:
        resolve_loss(loss, task)  # unknown loss / task: fail now, not at fit start
        names = list(CHECKS) if checks is None else list(checks)
        unknown = [n for n in names if n not in CHECKS]
        if unknown or not names:
            raise ValueError(f"`checks` must name recipe checks among {list(CHECKS)}, got {unknown or names!r}")
        options = {k: dict(v) for k, v in (options or {}).items()}
        self.optimizer = _check_optimizer(optimizer)
        for name in ("input_baseline", "overfit_batch"):
            options.setdefault(name, {}).setdefault("optimizer", self.optimizer)
        validate_options(options)
        self.loss, self.task, self.checks, self.options = loss, task, names, options
        self.input_key, self.target_key = input_key, target_key
        self.raise_on_failure = argcheck.boolean("raise_on_failure", raise_on_failure)
        self.seed = argcheck.integer("seed", seed)
        self.report: RecipeReport | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.report is not None or batch_idx != 0 or trainer.global_step != 0:
            return
        self.report = self.run(trainer, pl_module, batch)

    def run(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> RecipeReport:
        """Check ``batch`` now; print, log, and raise if asked (see the class docstring)."""
        options = dict(self.options)
        if "gradient_flow" in self.checks:  # a parameter is trained when any optimizer has it
            options["gradient_flow"] = {"user_optimizer": list(trainer.optimizers), **options.get("gradient_flow", {})}
        report = run_recipe(
            pl_module, batch, self.loss, checks_to_run=self.checks, options=options, task=self.task,
            input_key=self.input_key, target_key=self.target_key, seed=self.seed,
            context=trainer.precision_plugin.train_step_context,
            user_optimizer=trainer.optimizers[0] if trainer.optimizers else None,
        )
        rank_zero_info(f"RecipeChecks on the first training batch:\n{report.table()}")
        if trainer.is_global_zero:
            self._log(trainer, report)
        failed = bool(trainer.strategy.broadcast(bool(report.failed), src=0))
        if failed and self.raise_on_failure:
            raise RuntimeError(
                "RecipeChecks: failed " + ", ".join(f"{r.name} ({r.fix})" for r in report.failed)
                + " — set raise_on_failure=False to train anyway"
            )
        return report

    @staticmethod
    def _log(trainer: Trainer, report: RecipeReport) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(report.metrics(), step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_table(key="recipe_checks", columns=list(COLUMNS), data=report.rows())
