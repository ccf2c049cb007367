"""Reduce-on-plateau as a pure state machine for any hyper-parameter.

:class:`Plateau` holds one value (an lr, a weight decay, any param-group field) and shrinks it
by ``factor`` when a monitored metric stops improving. It is the rule of
``torch.optim.lr_scheduler.ReduceLROnPlateau``, step for step (same NaN handling, threshold
modes, cooldown, ``eps``), but detached from any optimizer: ``update(metric)`` returns the new
value and the caller writes it wherever it belongs (``pl_optim.callbacks.ParamScheduler`` writes
it into a param-group field).

With :math:`b` the best metric so far, a metric :math:`m` is an improvement when
(``mode="min"``) :math:`m < b(1-\\tau)` (``threshold_mode="rel"``) or :math:`m < b-\\tau`
(``"abs"``), mirrored for ``mode="max"``. After more than ``patience`` consecutive epochs
without improvement, :math:`v \\leftarrow \\max(v\\,f, v_{min})` if that changes :math:`v` by
more than ``eps``; then ``cooldown`` epochs are ignored. A NaN metric is never an improvement.
"""

from __future__ import annotations

import math
from typing import Any, SupportsFloat

from pl_optim import checks

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


class Plateau:
    """A value reduced by ``factor`` when a metric plateaus (torch ``ReduceLROnPlateau``'s rule).

    Also a schedule ``(step, total) -> value`` (it returns its current value whatever the step),
    so :class:`pl_optim.callbacks.ParamScheduler` can hold it like any other schedule and feed it
    the monitored metric.

    Args:
        initial: the starting value (torch: the param group's ``lr``).
        mode: ``"min"`` (the metric should decrease) or ``"max"``.
        factor: multiplier applied on a plateau, in (0, 1).
        patience: epochs with no improvement tolerated before reducing (integer >= 0).
        threshold: how much better than the best counts as an improvement (>= 0; 0 means any
            strict improvement), relative or absolute per ``threshold_mode``.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: epochs after a reduction during which bad epochs are not counted.
        min_value: lower bound of the value (torch: ``min_lr``).
        eps: a reduction smaller than this is skipped.
        monitor: name of the metric to feed (used by the Lightning integration; informative here).

    Raises:
        ValueError: a bad argument (the message names it and echoes the value).

    Example::

        p = Plateau(initial=0.1, patience=2, factor=0.5)
        for val_loss in (1.0, 0.9, 0.9, 0.9, 0.9):
            lr = p.update(val_loss)     # 0.1, 0.1, 0.1, 0.1, 0.05
    """

    def __init__(
        self,
        initial: float = 1.0,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_value: float = 0.0,
        eps: float = 1e-8,
        monitor: str = "val_loss",
    ) -> None:
        self.initial = checks.finite("initial", initial)
        self.mode = checks.one_of("mode", mode, MODES)
        self.factor = checks.fraction("factor", factor)
        self.patience = checks.integer("patience", patience, minimum=0)
        self.threshold = checks.non_negative("threshold", threshold)
        self.threshold_mode = checks.one_of("threshold_mode", threshold_mode, THRESHOLD_MODES)
        self.cooldown = checks.integer("cooldown", cooldown, minimum=0)
        self.min_value = checks.finite("min_value", min_value)
        self.eps = checks.non_negative("eps", eps)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty metric name, got {monitor!r}")
        self.monitor = monitor
        self.reset()

    def reset(self) -> None:
        """Back to the initial value with no history."""
        self.value = self.initial
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.updates = 0

    def is_better(self, metric: float) -> bool:
        """Whether ``metric`` improves on the best so far (NaN never does)."""
        best = self.best
        if self.mode == "min":
            return metric < (best * (1.0 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return metric > (best * (1.0 + self.threshold) if self.threshold_mode == "rel" else best + self.threshold)

    def update(self, metric: SupportsFloat) -> float:
        """Feed one epoch's metric; return the (possibly reduced) value."""
        current = float(metric)
        self.updates += 1
        if self.is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown are ignored
        if self.num_bad_epochs > self.patience:
            new = max(self.value * self.factor, self.min_value)
            if self.value - new > self.eps:
                self.value = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return self.value

    def __call__(self, step: int, total: int) -> float:
        """The current value (a plateau schedule does not depend on the step)."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers: the value and the plateau detector's counters."""
        return {"value": self.value, "best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.value, self.best = float(state["value"]), float(state["best"])
        self.num_bad_epochs, self.cooldown_counter = int(state["num_bad_epochs"]), int(state["cooldown_counter"])
        self.updates = int(state.get("updates", 0))

    def __repr__(self) -> str:
        return (f"Plateau(value={self.value:g}, monitor={self.monitor!r}, mode={self.mode!r}, factor={self.factor:g}, "
                f"patience={self.patience}, threshold={self.threshold:g}, threshold_mode={self.threshold_mode!r}, "
                f"cooldown={self.cooldown}, min_value={self.min_value:g})")
