"""Export a self-compressed network as a plain module.

:func:`export_compressed` returns a copy of the network in which every quantised layer holds its
quantised weight as an ordinary ``nn.Parameter`` (no ``bits``/``exponent``, no parametrization).
The bit-packed file format is in :mod:`.packed`, BatchNorm recalibration in :mod:`.batchnorm`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from pl_optim.compression.graph import ChannelGraph, zero_rows
from pl_optim.compression.quantizer import quantized_layers
from pl_optim.compression.surgery import ChannelRemover


def export_compressed(module: nn.Module, example_input: torch.Tensor | tuple | None = None) -> nn.Module:
    """A deep copy of ``module`` whose quantised layers hold their quantised weights as plain
    ``nn.Parameter``s (quantiser parameters and parametrizations removed).

    Args:
        module: a network carrying quantisers (pass the network, e.g. ``pl_module.net``, or the
            LightningModule itself when it is not attached to a running Trainer).
        example_input: an input of ``module`` (or a tuple of them). When given, dead channels still
            present (zero weight rows whose constant contribution is exactly 0, see
            :mod:`.graph`) are removed from the copy, which then has fewer channels and the same
            outputs. Channels removed during training are gone already.

    Returns:
        The plain module; ``module`` itself is unchanged.

    Raises:
        ValueError: ``module`` has no quantised layer.

    Example::

        small = export_compressed(model.net)
        torch.save(small.state_dict(), "small.pt")
    """
    if not quantized_layers(module):
        raise ValueError(f"`module` ({type(module).__name__}) has no quantised layer to export")
    plain = copy.deepcopy(module)
    for layer, _ in quantized_layers(plain).values():
        # the copy shares the parametrized class torch injected into the original; removing the
        # parametrization deletes a property from that class, so give the copy a class of its own
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    if example_input is not None:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        graph = ChannelGraph(plain, *args)
        ChannelRemover(graph).remove(graph.removable(zero_rows(plain, graph)))
    return plain
