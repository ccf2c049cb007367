"""Shared plumbing of the pl_optim precision plugins: what happens around a step attempt.

* a skipped step (GradScaler inf/NaN, non-finite gradients) is reported to the optimizer's
  :class:`~pl_optim.steps.StepLedger` (``note_skipped``), so no pl_optim callback advances;
* it is published: ``amp/skipped_steps``, ``amp/last_step_skipped`` and ``amp/loss_scale`` (fp16)
  go to every logger and to
  ``trainer.callback_metrics``; the plugin keeps ``skipped_steps`` / ``last_step_skipped``;
* torch LR schedulers from ``configure_optimizers`` with ``interval="step"`` do not step after a
  skipped step (their class is swapped for a subclass whose ``step`` asks the ledger; restored at
  teardown; no state is added to the scheduler);
* the skipped step is taken out of ``trainer.global_step`` (Lightning's optimizer-step progress),
  so ``max_steps`` counts updates that ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from pl_optim import checks
from pl_optim.callbacks._base import log_step_metrics
from pl_optim.precision import check_scaler_optimizer, nonfinite_gradients
from pl_optim.steps import StepLedger

_GUARDED: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    """A subclass of scheduler class ``cls`` whose ``step()`` does nothing after a skipped step."""
    if getattr(cls, "_pl_optim_guarded", False):
        return cls
    if cls not in _GUARDED:

        def step(self: Any, *args: Any, **kwargs: Any) -> None:
            if StepLedger.of(self.optimizer).last_skipped:
                return None
            return cls.step(self, *args, **kwargs)

        _GUARDED[cls] = type(cls.__name__, (cls,), {"step": step, "_pl_optim_guarded": True, "__module__": cls.__module__})
    return _GUARDED[cls]


class SkipBookkeeping:
    """Mixin for the precision plugins: skip counters, metrics, scheduler guard, global_step."""

    hold_schedulers: bool = True
    skipped_steps: int = 0
    last_step_skipped: bool = False
    _swapped: list[tuple[Any, type]]

    def _init_bookkeeping(self, hold_schedulers: bool) -> None:
        self.hold_schedulers = checks.boolean("hold_schedulers", hold_schedulers)
        self.skipped_steps, self.last_step_skipped = 0, False
        self._swapped = []

    def _guard_schedulers(self, optimizers: list[Any], lr_scheduler_configs: list[Any]) -> None:
        for opt in optimizers:
            StepLedger.of(opt)  # count from the first step, even when nothing else subscribes
        if not self.hold_schedulers:
            return
        for config in lr_scheduler_configs:
            sched = config.scheduler
            if config.interval == "step" and isinstance(getattr(sched, "optimizer", None), torch.optim.Optimizer):
                original = type(sched)
                guarded = _guarded_class(original)
                if guarded is not original:
                    sched.__class__ = guarded
                    self._swapped.append((sched, original))

    def _restore_schedulers(self) -> None:
        for sched, original in self._swapped:
            sched.__class__ = original
        self._swapped = []

    def _record(self, model: LightningModule, optimizer: torch.optim.Optimizer, skipped: bool, extra: dict[str, float]) -> None:
        """After a step attempt: ledger, counters, global_step, metrics."""
        self.last_step_skipped = skipped
        trainer = getattr(model, "_trainer", None)
        if skipped:
            self.skipped_steps += 1
            StepLedger.of(optimizer).note_skipped()
            if trainer is not None:
                _uncount_step(trainer, model)
        if trainer is not None:
            metrics = {"amp/skipped_steps": float(self.skipped_steps), "amp/last_step_skipped": float(skipped)}
            log_step_metrics(trainer, {**metrics, **extra})

    def teardown(self) -> None:
        self._restore_schedulers()
        super().teardown()  # type: ignore[misc]

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """The ``optimizer_step`` of the plugins without a loss scaler (the fp16 one overrides it): run the closure, then step
        unless a gradient is non-finite (a NaN/inf loss skips the step like a scaler would)."""
        check_scaler_optimizer(optimizer, type(self).__name__)
        model = lightning_module(model)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            return closure_result  # training_step returned None: no backward, nothing to step
        self._after_closure(model, optimizer)  # type: ignore[attr-defined]  (Precision's hook + clipping)
        skipped = nonfinite_gradients(optimizer)
        out = None if skipped else optimizer.step(**kwargs)
        self._record(model, optimizer, skipped, {})
        return closure_result if skipped else out

    def _bookkeeping_state(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def _load_bookkeeping_state(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))


def _uncount_step(trainer: Trainer, model: LightningModule) -> None:
    """Take the step being attempted out of Lightning's optimizer-step progress (the source of
    ``trainer.global_step``): Lightning increments ``ready`` before and ``completed`` after
    ``optimizer_step``; we are in between, so both net to zero."""
    loop = trainer.fit_loop.epoch_loop
    if model.automatic_optimization:
        progress = loop.automatic_optimization.optim_progress.optimizer.step
    else:
        progress = loop.manual_optimization.optim_step_progress
    for tracker in (progress.total, progress.current):
        tracker.ready -= 1
        tracker.completed -= 1


def lightning_module(model: Any) -> Any:
    """The LightningModule inside a strategy wrapper (DDP's ``.module``)."""
    return getattr(model, "module", model) if not isinstance(model, LightningModule) else model
