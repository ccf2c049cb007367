"""Pure bf16 training (params, grads, optimizer state in bf16) with compensated updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.plugins import HalfPrecision
from torch import nn

from pl_optim import checks
from pl_optim.callbacks._precision import SkipBookkeeping
from pl_optim.compression.quantizer import ChannelQuantizer
from pl_optim.precision import COMPENSATIONS, CompensatedUpdate, check_scaler_optimizer


class PureBF16(SkipBookkeeping, HalfPrecision):
    """``bf16-true`` (the model, its gradients and the optimizer state in bfloat16) whose updates
    are compensated so that small ones are not lost, for ANY torch optimizer.

    Around every step that counts, :class:`pl_optim.precision.CompensatedUpdate` runs the
    optimizer on a float32 view and stores the result back with Kahan summation (a bf16
    compensation buffer per parameter, in the optimizer state, so checkpoints hold it) or
    stochastic rounding. Its ledger hooks are subscribed at setup, before every callback's, so
    ``DecoupledWeightDecay`` and ``SelfCompression``'s size gradient act on the float32 view.

    A step with non-finite gradients (e.g. a NaN loss) is skipped and handled like a loss-scaler
    skip (ledger, ``amp/skipped_steps``, LR schedulers held, not counted in ``global_step``).

    Modules of the ``keep_fp32`` types keep float32 parameters (default: self-compression's
    ``ChannelQuantizer``, whose bit depths and exponents take updates far below a bf16 ulp and are
    two numbers per channel); float32 parameters are stepped as usual.

    Args:
        compensation: ``"kahan"`` (default), ``"stochastic"`` or ``"none"`` (plain bf16-true
            storage, float32 update arithmetic).
        seed: seed of the stochastic-rounding generators (identical on every rank).
        keep_fp32: module types whose parameters stay float32.
        hold_schedulers: don't step ``interval="step"`` LR schedulers after skipped steps.

    Raises:
        ValueError: unknown ``compensation``; LBFGS at setup.

    Example::

        trainer = Trainer(plugins=[PureBF16(compensation="kahan")], max_steps=10)
    """

    def __init__(
        self,
        compensation: str = "kahan",
        seed: int = 0,
        keep_fp32: Sequence[type[nn.Module]] = (ChannelQuantizer,),
        hold_schedulers: bool = True,
    ) -> None:
        super().__init__("bf16-true")
        self.compensation = checks.one_of("compensation", compensation, COMPENSATIONS)
        self.seed = checks.integer("seed", seed, minimum=0)
        self.keep_fp32 = tuple(keep_fp32)
        for t in self.keep_fp32:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise ValueError(f"`keep_fp32` must hold nn.Module subclasses, got {t!r}")
        self._init_bookkeeping(hold_schedulers)
        self.updates: list[CompensatedUpdate] = []
        self._pending: list[dict[str, Any]] | None = None

    def convert_module(self, module: nn.Module) -> nn.Module:
        keep = {id(t) for m in module.modules() if isinstance(m, self.keep_fp32) for t in (*m.parameters(), *m.buffers())}
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point() and id(t) not in keep:
                t.data = t.data.to(torch.bfloat16)
        return module

    def connect(self, model: Any, optimizers: list, lr_scheduler_configs: list) -> Any:
        for opt in optimizers:
            check_scaler_optimizer(opt, type(self).__name__)
        self._detach()
        self.updates = [CompensatedUpdate(opt, self.compensation, seed=self.seed) for opt in optimizers]
        if self._pending is not None:
            self._load_updates(self._pending)
        self._guard_schedulers(optimizers, lr_scheduler_configs)
        return super().connect(model, optimizers, lr_scheduler_configs)

    def _detach(self) -> None:
        for update in self.updates:
            update.detach()
        self.updates = []

    def teardown(self) -> None:
        self._detach()
        super().teardown()

    def state_dict(self) -> dict[str, Any]:
        return {"updates": [u.state_dict() for u in self.updates], **self._bookkeeping_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_bookkeeping_state(state_dict)
        self._pending = list(state_dict.get("updates", []))
        if self.updates:
            self._load_updates(self._pending)

    def _load_updates(self, states: list[dict[str, Any]]) -> None:
        for update, state in zip(self.updates, states):
            update.load_state_dict(state)
        self._pending = None
