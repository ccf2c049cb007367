"""OneCycle: Smith's 1cycle learning rate and momentum, counted in optimizer steps that ran."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from pl_optim import checks
from pl_optim.callbacks.param_scheduler import ParamScheduler
from pl_optim.schedules import Constant, one_cycle


class OneCycle(ParamScheduler):
    r"""1cycle policy (Smith 2018, "super-convergence"): lr up then down, momentum the opposite way.

    With :math:`\eta_0 = \eta_{max}/\text{div\_factor}` and
    :math:`\eta_{min} = \eta_0/\text{final\_div\_factor}`, over :math:`T` optimizer steps:
    lr :math:`\eta_0 \nearrow \eta_{max}` during the first ``pct_start`` of the run, then
    :math:`\searrow \eta_{min}` (cosine or linear); momentum
    ``max_momentum -> base_momentum -> max_momentum``. ``three_phase`` goes back to
    :math:`\eta_0` symmetrically before annealing to :math:`\eta_{min}`. Arguments and values equal
    ``torch.optim.lr_scheduler.OneCycleLR`` (same phase boundaries; equal to 1e-12 step by step),
    but the position is the number of optimizer steps that actually ran (accumulation and
    GradScaler-skipped steps handled), ``total_steps`` is derived from the Trainer, the state is
    checkpointed, and past the end the final values are held (with one warning) instead of raising.

    Momentum goes to ``momentum`` (SGD, RMSprop) or ``betas[0]`` (Adam family); ``beta2`` (the
    fastai/Gugger-Howard recommendation is 0.99) optionally fixes ``betas[1]``. Resuming with a
    different ``max_epochs``: see ``on_resume`` in :class:`ParamScheduler` (default: keep the
    checkpoint's ``total_steps``, as torch's scheduler state does).

    Args:
        max_lr: peak lr (float), one per param group (list), or ``"find"``: take the suggestion of
            the :class:`~pl_optim.callbacks.LRRangeTest` callback in the same Trainer (run before
            the first step; saved in the checkpoint so a resume does not re-run it).
        total_steps: schedule length in optimizer steps (one int, or one per optimizer); default:
            derived from the Trainer.
        pct_start: fraction of the steps spent increasing the lr, in (0, 1).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        cycle_momentum: cycle ``momentum``/``betas[0]`` inversely to the lr.
        base_momentum: lowest momentum, in [0, 1) (float or per group).
        max_momentum: highest momentum, in [0, 1) (float or per group).
        div_factor: ``initial_lr = max_lr / div_factor``.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``.
        three_phase: the symmetric three-phase variant.
        beta2: if given, ``betas[1]`` is held at this value (Adam family only).
        optimizers: indices of the optimizers to drive (default all; each its own counter).
        on_resume: ``"checkpoint"`` or ``"trainer"`` (see :class:`ParamScheduler`).

    Raises:
        ValueError: a bad argument (named, with its value); at fit start, a per-group list of the
            wrong length, momentum cycling on an optimizer without momentum (e.g. Adagrad), a torch
            LR scheduler on the same optimizer, or ``"find"`` without an ``LRRangeTest`` callback.

    Example::

        trainer = Trainer(max_epochs=30, accumulate_grad_batches=2,
                          callbacks=[OneCycle(max_lr=3e-3, beta2=0.99)])
    """

    def __init__(
        self,
        max_lr: float | Sequence[float] | str,
        total_steps: int | Sequence[int] | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | Sequence[float] = 0.85,
        max_momentum: float | Sequence[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        beta2: float | None = None,
        optimizers: int | Sequence[int] | None = None,
        on_resume: str = "checkpoint",
    ) -> None:
        if isinstance(max_lr, str) and max_lr != "find":
            raise ValueError(f"`max_lr` must be a positive number, a list of them, or 'find', got {max_lr!r}")
        if isinstance(max_lr, (list, tuple)) and not max_lr:
            raise ValueError(f"`max_lr` must not be an empty list, got {max_lr!r}")
        lrs = [] if isinstance(max_lr, str) else list(max_lr) if isinstance(max_lr, (list, tuple)) else [max_lr]
        bases = list(base_momentum) if isinstance(base_momentum, (list, tuple)) else [base_momentum]
        maxes = list(max_momentum) if isinstance(max_momentum, (list, tuple)) else [max_momentum]
        common = dict(pct_start=pct_start, anneal_strategy=anneal_strategy, div_factor=div_factor,
                      final_div_factor=final_div_factor, three_phase=three_phase)
        for lr in lrs or [1.0]:  # validates every argument, naming it and echoing the value
            for b in bases:
                for m in maxes:
                    one_cycle(lr, base_momentum=b, max_momentum=m, **common)
        checks.in_range("beta2", beta2, 0.0, 1.0, high_open=True, allow_none=True)
        self.max_lr, self.cycle_momentum, self.beta2 = max_lr, checks.boolean("cycle_momentum", cycle_momentum), beta2
        self.base_momentum, self.max_momentum, self.one_cycle_kwargs = base_momentum, max_momentum, common
        self.resolved_max_lr: list[float] | None = None  # per group, after "find"
        # The schedules for a run with scalar arguments (one schedule for every param group, so groups
        # added during training follow it too); per-group lists and "find" are built per optimizer at
        # train start by `schedules_for`.
        super().__init__(self._build(1.0 if max_lr == "find" else max_lr, None), None,
                         total_steps=total_steps, optimizers=optimizers, on_resume=on_resume)

    def _build(self, max_lr: float | Sequence[float], n: int | None) -> dict[str, Any]:
        """``{"lr": ..., "momentum": ..., "beta2": ...}``: one schedule for all groups when every
        argument is a scalar, else one per group (``n`` groups)."""
        per_group = any(isinstance(v, (list, tuple)) for v in (max_lr, self.base_momentum, self.max_momentum))
        if per_group and n is None:  # construction: validated, built for real at train start
            n = max(len(v) for v in (max_lr, self.base_momentum, self.max_momentum) if isinstance(v, (list, tuple)))
        if not per_group:
            lr, mom = one_cycle(max_lr, base_momentum=self.base_momentum, max_momentum=self.max_momentum,
                                **self.one_cycle_kwargs)
            schedules: dict[str, Any] = {"lr": lr, "momentum": mom}
        else:
            lrs, bases, maxes = (checks.per_item(name, value, n) for name, value in (
                ("max_lr", max_lr), ("base_momentum", self.base_momentum), ("max_momentum", self.max_momentum)))
            pairs = [one_cycle(lr, base_momentum=b, max_momentum=m, **self.one_cycle_kwargs)
                     for lr, b, m in zip(lrs, bases, maxes)]
            schedules = {"lr": [p[0] for p in pairs], "momentum": [p[1] for p in pairs]}
        if not self.cycle_momentum:
            del schedules["momentum"]
        if self.beta2 is not None:
            schedules["beta2"] = Constant(self.beta2)
        return schedules

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.max_lr == "find" and self._finder(trainer) is None:
            raise ValueError(
                "OneCycle(max_lr='find') needs an LRRangeTest callback in the same Trainer: "
                "Trainer(callbacks=[LRRangeTest(), OneCycle(max_lr='find')])"
            )
        super().on_fit_start(trainer, pl_module)

    @staticmethod
    def _finder(trainer: Trainer) -> Any:
        from pl_optim.callbacks.lr_range_test import LRRangeTest

        return next((cb for cb in trainer.callbacks if isinstance(cb, LRRangeTest)), None)

    def schedules_for(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        if self.cycle_momentum and "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
            raise ValueError(
                f"`cycle_momentum=True` but {type(optimizer).__name__} has neither `momentum` nor `betas`; "
                "pass cycle_momentum=False (supported: SGD, RMSprop, Adam, AdamW, NAdam, ... )"
            )
        if self.beta2 is not None and "betas" not in optimizer.defaults:
            raise ValueError(f"`beta2={self.beta2}` needs an Adam-family optimizer with `betas`, got {type(optimizer).__name__}")
        max_lr = self.max_lr
        if max_lr == "find":
            if self.resolved_max_lr is None:  # fresh run; a resumed one restored it from the checkpoint
                self.resolved_max_lr = self._finder(trainer).suggestion_for(trainer, trainer.lightning_module, optimizer)
            max_lr = self.resolved_max_lr
            if len(set(max_lr)) == 1:
                max_lr = max_lr[0]
        return self._build(max_lr, len(optimizer.param_groups)), {}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.resolved_max_lr is not None:
            state["max_lr"] = list(self.resolved_max_lr)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "max_lr" in state_dict:
            self.resolved_max_lr = [float(v) for v in state_dict["max_lr"]]
