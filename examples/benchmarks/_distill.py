"""Distillation from a float teacher, shared by the benchmarks' ``--distill`` flags.

``(1 - a) * loss + a * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015, with
their usual ``a = 0.5``, ``T = 2``): the teacher is the float model of the same seed, trained first; it runs
in eval mode without gradient. Modules keep it in a tuple (``Distilled.teacher``), so it is never registered
as a submodule: ``SelfCompression`` attaches no quantisers to it and checkpoints do not carry it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ALPHA, T = 0.5, 2.0


def distill_loss(loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, teacher: nn.Module) -> torch.Tensor:
    """``loss`` (the task loss on ``logits``) mixed with the soft-target term of ``teacher`` on ``x``."""
    with torch.no_grad():
        soft = F.softmax(teacher(x) / T, dim=1)
    kd = F.kl_div(F.log_softmax(logits / T, dim=1), soft, reduction="batchmean") * T**2
    return (1 - ALPHA) * loss + ALPHA * kd


class Distilled:
    """Mixin for a LightningModule: ``teacher`` set to ``(net,)`` turns on :func:`distill_loss` in the
    module's own ``training_step`` (which calls ``self.distilled(loss, logits, x)``)."""

    teacher: tuple[nn.Module, ...] = ()

    def distilled(self, loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return distill_loss(loss, logits, x, self.teacher[0]) if self.teacher else loss
