"""fp16 autocast with dynamic loss scaling on CUDA and CPU, whose skipped steps nothing counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import MixedPrecision

from pl_optim import checks
from pl_optim.callbacks._precision import SkipBookkeeping, lightning_module
from pl_optim.precision import check_scaler_optimizer, scaler_found_inf

DEVICES = ("auto", "cpu", "cuda")


class LossScaledMixedPrecision(SkipBookkeeping, MixedPrecision):
    """fp16 mixed precision (``torch.autocast(dtype=float16)`` + ``torch.amp.GradScaler``) on
    CUDA **and CPU** (Lightning's ``precision="16-mixed"`` turns into bf16 on CPU).

    Differences from Lightning's ``MixedPrecision``: every optimizer, fused/foreach ones included,
    is unscaled explicitly before ``on_before_optimizer_step`` (so gradient clipping works and a
    fused optimizer never receives an inf step); a step the scaler skips is reported to the
    :class:`~pl_optim.steps.StepLedger` (no pl_optim callback advances), is not counted in
    ``trainer.global_step``, does not step torch LR schedulers with ``interval="step"``
    (``hold_schedulers=False`` restores Lightning's behaviour) and is published as
    ``amp/skipped_steps`` with ``amp/loss_scale`` (loggers and ``trainer.callback_metrics``).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (the device of the model at setup).
        scaler: a ``torch.amp.GradScaler`` to use (default: a new one for the device with the
            scaling arguments below).
        init_scale: initial loss scale (torch default 2**16).
        growth_factor: scale multiplier after ``growth_interval`` finite steps (> 1).
        backoff_factor: scale multiplier after a skipped step (in (0, 1)).
        growth_interval: finite steps between growths.
        hold_schedulers: don't step ``interval="step"`` LR schedulers after skipped steps.

    Raises:
        ValueError: bad argument; LBFGS at setup.

    Example::

        trainer = Trainer(accelerator="cpu", plugins=[LossScaledMixedPrecision("cpu")], max_steps=10)
    """

    def __init__(
        self,
        device: str = "auto",
        scaler: torch.amp.GradScaler | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hold_schedulers: bool = True,
    ) -> None:
        self.requested_device = checks.one_of("device", device, DEVICES)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"`scaler` must be a torch.amp.GradScaler or None, got {scaler!r}")
        self._scaler_args = dict(
            init_scale=checks.positive("init_scale", init_scale),
            growth_factor=checks.in_range("growth_factor", growth_factor, 1.0, float("inf"), low_open=True),
            backoff_factor=checks.in_range("backoff_factor", backoff_factor, 0.0, 1.0, True, True),
            growth_interval=checks.integer("growth_interval", growth_interval, minimum=1),
        )
        self._init_bookkeeping(hold_schedulers)
        device0 = "cpu" if device == "auto" else device
        super().__init__("16-mixed", device0, scaler=scaler or torch.amp.GradScaler(device0, **self._scaler_args))
        self._user_scaler = scaler is not None

    # -- setup ---------------------------------------------------------------------------------
    def connect(self, model: Any, optimizers: list, lr_scheduler_configs: list) -> Any:
        if self.requested_device == "auto":
            param = next(iter(model.parameters()), None)
            device = "cuda" if param is not None and param.device.type == "cuda" else "cpu"
            if device != self.device and not self._user_scaler:
                self.scaler = torch.amp.GradScaler(device, **self._scaler_args)
            self.device = device
        for opt in optimizers:
            check_scaler_optimizer(opt, type(self).__name__)
        self._guard_schedulers(optimizers, lr_scheduler_configs)
        return super().connect(model, optimizers, lr_scheduler_configs)

    # -- the step ------------------------------------------------------------------------------
    def optimizer_step(
        self, optimizer: Any, model: LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        check_scaler_optimizer(optimizer, type(self).__name__)
        model = lightning_module(model)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            return closure_result  # training_step returned None: no backward, nothing to step
        self.scaler.unscale_(optimizer)  # fused optimizers too: they then get grad_scale=None
        self._after_closure(model, optimizer)
        skipped = scaler_found_inf(self.scaler, optimizer)
        out = None if skipped else self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        self._record(model, optimizer, skipped, {"amp/loss_scale": float(self.scaler.get_scale())})
        return out if not skipped else closure_result

    def clip_gradients(self, optimizer: Any, clip_val: float = 0.0, gradient_clip_algorithm: Any = None) -> None:
        """Clip the (already unscaled) gradients; unlike ``MixedPrecision`` this also works for
        fused optimizers, because they are unscaled explicitly before clipping here."""
        from lightning.pytorch.plugins.precision import Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType

        algorithm = GradClipAlgorithmType.NORM if gradient_clip_algorithm is None else gradient_clip_algorithm
        Precision.clip_gradients(self, optimizer, clip_val=clip_val, gradient_clip_algorithm=algorithm)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), **self._bookkeeping_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        scaler_state = state_dict.get("scaler", state_dict)  # also Lightning MixedPrecision's format
        self.scaler.load_state_dict(scaler_state)
        self._load_bookkeeping_state(state_dict)
