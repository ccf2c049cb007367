"""Shared plumbing of the pl_optim callbacks: step-ledger subscription and positions, logging,
strategy checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from pl_optim.steps import StepHooks, StepLedger

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def refuse_sharded_strategy(trainer: Trainer, feature: str) -> None:
    """Raise a clear error when the strategy shards parameters (FSDP, DeepSpeed, model parallel)."""
    name = type(trainer.strategy).__name__
    if name in _SHARDED:
        raise RuntimeError(
            f"{feature} does not support strategy {name} (sharded parameters); supported: single "
            "device, 'ddp', 'ddp_spawn' and their variants"
        )


def group_metric_names(prefix: str, optimizers: Sequence[torch.optim.Optimizer]) -> list[list[str]]:
    """Metric names per optimizer and param group, exactly as ``LearningRateMonitor`` builds them:
    ``"{prefix}-Adam"``; ``"{prefix}-Adam/pg2"`` or ``"{prefix}-Adam/<group name>"`` with several
    groups (a group's ``"name"`` key wins); ``"{prefix}-Adam/<name>"`` for a single named group;
    ``"{prefix}-Adam-1"`` for the second optimizer of one class."""
    seen: dict[type, int] = {}
    names = []
    for opt in optimizers:
        cls = type(opt)
        seen[cls] = seen.get(cls, 0) + 1
        base = f"{prefix}-{cls.__name__}" + (f"-{seen[cls] - 1}" if seen[cls] > 1 else "")
        groups = opt.param_groups
        if len(groups) > 1:
            names.append([f"{base}/{g.get('name', f'pg{j + 1}')}" for j, g in enumerate(groups)])
        else:
            names.append([f"{base}/{groups[0]['name']}" if groups[0].get("name") else base])
    return names


def log_step_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Send per-step ``metrics`` to every logger at the current optimizer-step index the way
    ``LearningRateMonitor`` does (respecting ``log_every_n_steps``), and put them in
    ``trainer.callback_metrics`` so ``ModelCheckpoint``/``EarlyStopping`` can monitor them.
    Direct logger calls rather than ``pl_module.log``: Lightning re-emits a step metric's last
    value at later steps, which would report values for steps that never ran."""
    if not metrics:
        return
    for name, value in metrics.items():
        trainer.callback_metrics[name] = torch.tensor(float(value))
    if trainer._logger_connector.should_update_logs:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)


class StepHookCallback(Callback):
    """Base class for callbacks that act on every optimizer step that really ran.

    Subclasses override :meth:`before_step` / :meth:`after_step`, which the optimizers'
    :class:`~pl_optim.steps.StepLedger` calls (accumulation micro-batches, GradScaler-skipped
    steps and steps that updated nothing never reach them; re-entrant ``step()`` calls count
    once). They read their time from :meth:`position`, never from a counter of their own.

    **Positions, one rule for every callback**: ``position(i)`` is the number of steps of
    optimizer ``i`` that ran in this training, counted from the start of the fit — plus, when the
    fit resumes a checkpoint (``Trainer.fit(ckpt_path=...)``), the position saved in it. A new
    ``fit()`` without ``ckpt_path`` starts over at 0, even with a reused callback instance.
    Subclasses save :meth:`step_positions` in their ``state_dict`` and give them back with
    :meth:`load_step_positions`.

    Hooks are subscribed at ``on_fit_start`` and removed at ``teardown``. Lightning's order:
    ``on_fit_start`` runs after the optimizers exist but *before* their state (and the loops) are
    restored from a checkpoint; positions start at ``on_train_start``, so subclasses that override
    it call ``super().on_train_start`` first.
    """

    _step_hooks: StepHooks | None = None
    _origins: list[int] | None = None
    _resumed: list[int] | None = None
    _final: list[int] | None = None  # positions when the last fit ended (inspection, checkpoints)

    def before_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        """Called once the gradients of a step of optimizer ``index`` that will count exist, right
        before the update (under automatic optimization: after the closure's backward)."""

    def after_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        """Called right after a step of optimizer ``index`` that counted (position already advanced)."""

    def _uses(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(StepHookCallback, method)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._subscribe(trainer)

    #: subscribe ahead of the other callbacks (see :meth:`pl_optim.steps.StepLedger.subscribe`)
    early_subscriber = False

    def _subscribe(self, trainer: Trainer) -> None:
        self._remove_step_hooks()
        pre = (lambda i, o: self.before_step(trainer, i, o)) if self._uses("before_step") else None
        post = (lambda i, o: self.after_step(trainer, i, o)) if self._uses("after_step") else None
        self._step_hooks = StepHooks(trainer.optimizers, pre=pre, post=post, early=self.early_subscriber)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start_positions(trainer)

    # -- positions ----------------------------------------------------------------------------
    def start_positions(self, trainer: Trainer) -> None:
        """Fix the origins of :meth:`position`: 0 for a fresh fit, the checkpoint's for a resume."""
        ledgers = [StepLedger.of(o) for o in trainer.optimizers]
        resumed = self._resumed if self._resumed is not None else []
        if resumed and len(resumed) != len(ledgers):
            raise ValueError(
                f"the checkpoint of {type(self).__name__} has positions for {len(resumed)} optimizer(s), "
                f"the run has {len(ledgers)}"
            )
        self._ledgers, self._final = ledgers, None
        self._origins = [ledger.steps - (resumed[i] if resumed else 0) for i, ledger in enumerate(ledgers)]

    def position(self, index: int) -> int:
        """Steps of optimizer ``index`` that ran in this training (see the class docstring)."""
        if self._origins is None:
            idle = self._idle_positions()
            return idle[index] if index < len(idle) else 0
        return self._ledgers[index].steps - self._origins[index]

    def _idle_positions(self) -> list[int]:
        return list(self._resumed if self._resumed is not None else self._final or [])

    def step_positions(self) -> list[int]:
        """Every optimizer's :meth:`position` (what a checkpoint saves)."""
        if self._origins is None:
            return self._idle_positions()
        return [self.position(i) for i in range(len(self._origins))]

    def load_step_positions(self, positions: Sequence[Any]) -> None:
        """Positions from a checkpoint: the next ``on_train_start`` continues from them."""
        self._resumed = [int(p) for p in positions]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_step_hooks()
        if stage == "fit" and self._origins is not None:
            self._final = self.step_positions()
            self._origins, self._resumed = None, None  # a new fit() starts over

    def _remove_step_hooks(self) -> None:
        if self._step_hooks is not None:
            self._step_hooks.remove()
            self._step_hooks = None
