"""Export a ticket as a plain module and measure sparse vs dense encodings.

The masks are folded into the weights (pruned entries are exactly 0 already while training;
folding makes sure and drops every training-only attachment), so the result is an ordinary
``nn.Module`` of the user's own class — no ``weight_orig``/``weight_mask`` reparametrisation as
``torch.nn.utils.prune`` leaves behind. A structured ticket is already a smaller dense network.

Sizes of the prunable weights (everything else is counted dense in every encoding):

* dense: ``numel · b`` bytes (``b`` bytes per value, 4 for fp32);
* CSR of the ``[out, in·k·k]`` view: ``nnz · (b + 4)`` for values and int32 column indices,
  plus ``(rows + 1) · 4`` for the row pointers;
* bitmap: one bit per entry (``ceil(numel / 8)`` bytes) plus ``nnz · b`` for the values.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


def export_ticket(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode with ``masks`` folded into the weights.

    Args:
        model: the trained ticket (a ``LightningModule`` works; the copy keeps its class).
        masks: parameter name -> bool mask (``None``: nothing to fold, e.g. structured).

    Raises:
        ValueError: a mask names a parameter the model lacks, or has another shape.
    """
    params = dict(model.named_parameters())
    for name, m in (masks or {}).items():
        if name not in params:
            raise ValueError(f"mask for {name!r}, which is not a parameter of {type(model).__name__}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"mask of {name!r} has shape {tuple(m.shape)}, the parameter {tuple(params[name].shape)}")
    trainer = getattr(model, "_trainer", None)
    if trainer is not None:
        model._trainer = None  # a LightningModule attached to a Trainer: don't deep-copy the Trainer
    try:
        out = copy.deepcopy(model)
    finally:
        if trainer is not None:
            model._trainer = trainer
    out.eval()
    with torch.no_grad():
        new = dict(out.named_parameters())
        for name, m in (masks or {}).items():
            new[name].masked_fill_(~m.to(new[name].device, torch.bool), 0)
    for p in out.parameters():
        p.grad = None
    return out


@dataclass
class EncodingSize:
    """Bytes of a model's parameters in three encodings (see the module docstring)."""

    dense: int
    csr: int
    bitmap: int
    nonzero: int
    total: int

    @property
    def density(self) -> float:
        return self.nonzero / max(self.total, 1)


def encoding_bytes(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, value_bytes: int = 4
) -> EncodingSize:
    """Bytes of ``model``'s parameters, dense and with the masked weights sparse (CSR, bitmap).

    Args:
        model: the ticket.
        masks: the pruned parameters (``None``: every parameter dense — a structured ticket).
        value_bytes: bytes per stored value (4: fp32, 2: fp16/bf16).
    """
    masks = dict(masks or {})
    dense = csr = bitmap = nonzero = total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        dense += n * value_bytes
        if name not in masks:
            csr += n * value_bytes
            bitmap += n * value_bytes
            nonzero += n
            continue
        nnz = int(masks[name].sum())
        rows = p.shape[0] if p.dim() > 1 else 1
        nonzero += nnz
        csr += nnz * (value_bytes + 4) + (rows + 1) * 4
        bitmap += math.ceil(n / 8) + nnz * value_bytes
    return EncodingSize(dense, csr, bitmap, nonzero, total)
