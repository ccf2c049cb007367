"""Lightning front end of :func:`pl_optim.set_amsgrad`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from pl_optim import checks
from pl_optim.amsgrad import amsgrad_enabled, check_amsgrad_support, set_amsgrad
from pl_optim.callbacks._base import StepHookCallback, group_metric_names, log_step_metrics

INTERVALS = ("epoch", "step")


def scheduled_value(schedule: Mapping[int, bool], time: int) -> bool | None:
    """The value of the largest key ``<= time``, or ``None`` before the first key."""
    keys = [k for k in schedule if k <= time]
    return schedule[max(keys)] if keys else None


class AMSGradToggle(StepHookCallback):
    r"""Switch AMSGrad on and off during training, by epoch or by optimizer step.

    Adam divides by :math:`\sqrt{v_t}`; AMSGrad (Reddi et al.) by :math:`\sqrt{\hat v_t}` with
    :math:`\hat v_t = \max(\hat v_{t-1}, v_t)`. At epoch (or step) ``k`` the setting becomes
    ``schedule[k]`` and stays until the next key; before the first key the optimizer keeps its
    own setting. Switching uses :func:`pl_optim.set_amsgrad`, which creates ``max_exp_avg_sq``
    from the current ``exp_avg_sq`` (zeros before the first step, so ``{0: True}`` equals
    ``Adam(amsgrad=True)``) or drops it. With ``interval="step"`` time counts the optimizer steps
    that actually ran (not accumulation micro-batches, not AMP-skipped steps); the switch happens
    right before step ``k``. The scheduled setting is also enforced at ``on_train_start``, so a
    checkpoint saved under the other setting resumes cleanly. The state is logged each step as
    ``"amsgrad-<Optimizer>"`` (1.0 / 0.0; ``/pgN`` per group with several groups).

    Args:
        schedule: ``{time: enabled}``; times are integers >= 0 (epochs or steps).
        interval: ``"epoch"`` or ``"step"``.
        optimizers: index or indices of the trainer's optimizers to act on (``None``: all).
        log: send the setting to the trainer's loggers after each step that ran.

    Raises:
        ValueError: bad ``schedule``/``interval``/``optimizers`` (at construction); an optimizer
            without an ``amsgrad`` option, e.g. SGD (at fit start, naming its class).

    Example::

        trainer = Trainer(callbacks=[AMSGradToggle({0: False, 5: True})])   # AMSGrad from epoch 5
    """

    def __init__(
        self,
        schedule: Mapping[int, bool],
        interval: str = "epoch",
        optimizers: int | Sequence[int] | None = None,
        log: bool = True,
    ) -> None:
        if not isinstance(schedule, Mapping) or not schedule:
            raise ValueError(f"`schedule` must be a non-empty mapping {{time: bool}}, got {schedule!r}")
        for key, value in schedule.items():
            checks.integer("schedule key", key, minimum=0)
            checks.boolean(f"schedule[{key}]", value)
        checks.one_of("interval", interval, INTERVALS)
        indices = checks.indices("optimizers", optimizers)
        self.schedule = dict(schedule)
        self.interval = interval
        self.optimizer_indices = None if indices is None else list(indices)
        self.log = checks.boolean("log", log)
        self._stepped: set[int] = set()  # optimizers that stepped in the current batch

    def _targets(self, trainer: Trainer) -> list[int]:
        n = len(trainer.optimizers)
        return list(range(n)) if self.optimizer_indices is None else self.optimizer_indices

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = len(trainer.optimizers)
        for i in self._targets(trainer):
            checks.optimizer_in_range("optimizers", i, n)
            check_amsgrad_support(trainer.optimizers[i])
        super().on_fit_start(trainer, pl_module)

    def _apply(self, trainer: Trainer, index: int) -> None:
        time = trainer.current_epoch if self.interval == "epoch" else self.position(index)
        wanted = scheduled_value(self.schedule, time)
        optimizer = trainer.optimizers[index]
        if wanted is not None and amsgrad_enabled(optimizer) != [wanted] * len(optimizer.param_groups):
            set_amsgrad(optimizer, wanted)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        for i in self._targets(trainer):  # after the optimizer state was restored from a checkpoint
            self._apply(trainer, i)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.interval == "epoch":
            for i in self._targets(trainer):
                self._apply(trainer, i)

    def before_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        if self.interval == "step" and index in self._targets(trainer):
            self._apply(trainer, index)

    def after_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        self._stepped.add(index)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.log:
            names, metrics = group_metric_names("amsgrad", trainer.optimizers), {}
            for i in sorted(self._stepped.intersection(self._targets(trainer))):
                metrics.update((name, float(on)) for name, on in zip(names[i], amsgrad_enabled(trainer.optimizers[i])))
            log_step_metrics(trainer, metrics)
        self._stepped.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.step_positions()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_step_positions(state_dict["steps"])

    @property
    def steps(self) -> list[int]:
        """Optimizer steps that ran, per optimizer (:meth:`position`)."""
        return self.step_positions()
