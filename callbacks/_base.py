"""Shared plumbing of the pl_optim callbacks."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from pl_optim.steps import StepHooks

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def refuse_sharded_strategy(trainer: Trainer, feature: str) -> None:
    """Raise a clear error when the strategy shards parameters (FSDP, DeepSpeed, model parallel)."""
    name = type(trainer.strategy).__name__
    if name in _SHARDED:
        raise RuntimeError(
            f"{feature} does not support strategy {name} (sharded parameters); supported: single "
            "device, 'ddp', 'ddp_spawn' and their variants"
        )


class StepHookCallback(Callback):
    """Base class for callbacks that act on every optimizer step that actually runs.

    Subclasses override :meth:`before_step` / :meth:`after_step`. Hooks are registered on the
    trainer's (unwrapped torch) optimizers at ``on_fit_start`` and removed at ``teardown``, so
    gradient-accumulation micro-batches and AMP-skipped steps never reach them (see
    :mod:`pl_optim.steps`). Note Lightning's order: ``on_fit_start`` runs after the optimizers
    exist but *before* their state (and the loops) are restored from a checkpoint; use
    ``on_train_start`` to write values into ``param_groups`` that must win over the checkpoint.
    """

    def before_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        """Called right before ``optimizer.step()`` of optimizer ``index`` runs.

        Under Lightning's automatic optimization this is BEFORE the closure (forward + backward)
        that ``step(closure)`` evaluates, so ``p.grad`` still holds the previous step's
        gradients here. Work that needs this step's gradients belongs in
        ``on_before_optimizer_step`` (runs after backward, only on accumulation boundaries) or in
        a closure-wrapping pre-hook like :class:`pl_optim.weight_decay.DecoupledDecay`'s.
        """

    def after_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        """Called right after ``optimizer.step()`` of optimizer ``index`` ran."""

    def _uses(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(StepHookCallback, method)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_step_hooks()
        pre = (lambda i, o: self.before_step(trainer, i, o)) if self._uses("before_step") else None
        post = (lambda i, o: self.after_step(trainer, i, o)) if self._uses("after_step") else None
        self._step_hooks = StepHooks(trainer.optimizers, pre=pre, post=post)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_step_hooks()

    def _remove_step_hooks(self) -> None:
        hooks = getattr(self, "_step_hooks", None)
        if hooks is not None:
            hooks.remove()
            self._step_hooks = None
