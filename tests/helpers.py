"""Test helpers shared by tests/core and tests/callbacks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision


def fp16_cpu_plugin() -> MixedPrecision:
    """fp16 autocast + a real ``torch.amp.GradScaler("cpu")`` on CPU (Lightning's
    ``precision="16-mixed"`` needs CUDA; this exercises the same loss-scaling code path)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


class InjectInfGrad(Callback):
    """Make the gradients inf at the given batch indices (global batch counter), so that a
    GradScaler skips those optimizer steps."""

    def __init__(self, batches: Iterable[int]) -> None:
        self.batches = set(batches)
        self.seen = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.seen in self.batches:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
        self.seen += 1
