"""Shared pieces of the precision-plugin tests: the plugins by name and a one-shot inf injector."""

from __future__ import annotations

from lightning.pytorch import Callback

from pl_optim.callbacks import precision_plugin
from pl_optim.steps import StepLedger

#: every precision of the matrix: name -> (factory, skips non-finite steps)
PRECISIONS = {
    "32-true": (lambda: precision_plugin("32-true"), False),
    "fp16-cpu-scaler": (lambda: precision_plugin("16-mixed", device="cpu"), True),
    "bf16-mixed": (lambda: precision_plugin("bf16-mixed"), False),
    "bf16-true": (lambda: precision_plugin("bf16-true"), False),
    "pure-kahan": (lambda: precision_plugin("bf16-pure", compensation="kahan"), True),
    "pure-stochastic": (lambda: precision_plugin("bf16-pure", compensation="stochastic"), True),
    "pure-none": (lambda: precision_plugin("bf16-pure", compensation="none"), True),
}


class InjectAtStep(Callback):
    """Fill the gradients with ``value`` on the first batch at which ``trainer.global_step == step``
    (once per optimizer ledger: a skipped step leaves global_step unchanged, so a plain
    "global_step == step" would inject forever)."""

    def __init__(self, step: int | None, value: float = float("inf")) -> None:
        self.step, self.value, self.injected = step, value, 0

    def on_fit_start(self, trainer, pl_module) -> None:
        StepLedger.of(trainer.optimizers[0])  # count from the first step even with no other subscriber

    def on_after_backward(self, trainer, pl_module) -> None:
        ledger = StepLedger.of(trainer.optimizers[0])
        if trainer.global_step == self.step and ledger.skipped == 0 and not self.injected:
            self.injected += 1
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(self.value)
