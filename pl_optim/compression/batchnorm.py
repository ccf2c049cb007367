"""BatchNorm recalibration: re-estimate running statistics with the final (quantised) weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def recalibrate_batchnorm(module: nn.Module, inputs: Iterable) -> int:
    """Re-estimate every BatchNorm's running statistics with the current (quantised) weights.

    During self-compression the quantised weights keep jumping as bit depths fall, so the
    running mean/var (an exponential average over those changing weights) no longer match the
    final network and eval-mode accuracy suffers. This resets them and accumulates a plain
    average (``momentum=None``) over ``inputs`` in train mode without gradients, then restores
    each layer's momentum and the module's train/eval flags.

    Args:
        module: the network.
        inputs: an iterable of inputs (a tensor, or a tuple of positional arguments, per call).

    Returns:
        The number of BatchNorm layers recalibrated.

    Example::

        recalibrate_batchnorm(model.net, (x for x, _ in datamodule.train_dataloader()))
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    modes = {m: m.training for m in module.modules()}
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    try:
        with torch.no_grad():
            for x in inputs:
                module(*x) if isinstance(x, tuple) else module(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return len(norms)
