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


def distill_loss(loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, teacher: nn.Module,
                 alpha: float = ALPHA) -> torch.Tensor:
    """``loss`` (the task loss on ``logits``) mixed with the soft-target term of ``teacher`` on ``x``
    (weight ``alpha``)."""
    with torch.no_grad():
        soft = F.softmax(teacher(x) / T, dim=1)
    kd = F.kl_div(F.log_softmax(logits / T, dim=1), soft, reduction="batchmean") * T**2
    return (1 - alpha) * loss + alpha * kd


class Distilled:
    """Mixin for a LightningModule: ``teacher`` set to ``(net,)`` turns on :func:`distill_loss` in the
    module's own ``training_step`` (which calls ``self.distilled(loss, logits, x)``)."""

    teacher: tuple[nn.Module, ...] = ()
    distill_alpha: float = ALPHA

    def distilled(self, loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return distill_loss(loss, logits, x, self.teacher[0], self.distill_alpha) if self.teacher else loss


class PrecomputedTeacher(nn.Module):
    """``teacher``'s outputs on a fixed set of ``inputs`` (the training images: no augmentation), computed once in eval
    mode; a batch made of those inputs is answered by looking its rows up by content, so distillation costs no
    teacher forward per step (the student's step time then shrinks with the student). Rows not in the set go
    through ``teacher``. Same values as calling ``teacher`` on the batch, up to the float rounding of batch size."""

    def __init__(self, teacher: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        with torch.no_grad():
            outs = torch.cat([teacher(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
        self.table = {_key(row): out for row, out in zip(inputs, outs)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = [_key(row) for row in x]
        if all(k in self.table for k in keys):
            return torch.stack([self.table[k] for k in keys]).to(x.device)
        with torch.no_grad():
            return self.teacher(x)


def _key(row: torch.Tensor) -> bytes:
    return row.detach().cpu().contiguous().numpy().tobytes()
