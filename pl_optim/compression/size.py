"""Network size in bits and the size loss of self-compression.

For a quantised layer with output channels ``i`` (bit depth ``b_i``, :mod:`.quantizer`), kernel
area ``K = prod(weight.shape[2:])`` (1 for ``Linear``) and ``G`` groups, the size is

    Q_l = K * sum_i relu(b_i) * I_alive(g(i))

where ``I_alive(g)`` is the number of input channels of group ``g`` that are still alive, i.e.
whose quantised weights are not all zero in that group's rows (an input channel no weight reads
needs no storage). This is the paper's ``I*H*W*sum_i b_i`` with ``I`` counting only live inputs;
the counts are piecewise constant, so ``dQ/db_i = K * I_alive(g(i))`` for ``b_i > 0`` and 0 for
dead channels. When channel removal shrinks the weights, ``I`` and the row count shrink with
them. Network size ``Q = sum_l Q_l``; ``N = sum_l N_l`` counts the weights of the float model
(each quantiser's ``float_numel``, fixed at attach time), and the loss is

    L = L_0 + gamma * Q / N.

"% of float bits kept" is ``Q / (32 N)`` (see :mod:`.report`).
"""

from __future__ import annotations

import torch
from torch import nn

from pl_optim.compression.quantizer import ChannelQuantizer, quantized_layers

FLOAT_BITS = 32


def groups_of(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def live_input_columns(layer: nn.Module, quantizer: ChannelQuantizer) -> torch.Tensor:
    """``[C_out]`` int64: for each output channel, the number of live input channels of its group
    (input channels with a nonzero quantised weight in some row of the group). No gradient."""
    with torch.no_grad():
        w = layer.weight  # quantised
        g = groups_of(layer)
        c_out, c_in = w.shape[0], w.shape[1]
        nonzero = (w != 0).reshape(g, c_out // g, c_in, -1).any(dim=3).any(dim=1)  # [G, I_g]
        return nonzero.sum(dim=1).repeat_interleave(c_out // g)


def kernel_area(layer: nn.Module) -> int:
    area = 1
    for d in layer.parametrizations.weight.original.shape[2:]:
        area *= int(d)
    return area


def layer_size_bits(layer: nn.Module, quantizer: ChannelQuantizer) -> torch.Tensor:
    """``Q_l = K * sum_i relu(b_i) * I_alive(g(i))``, differentiable in ``bits``."""
    cols = live_input_columns(layer, quantizer).to(quantizer.bits.dtype)
    return kernel_area(layer) * (torch.relu(quantizer.bits) * cols).sum()


def size_bits(model: nn.Module) -> torch.Tensor:
    """Network size ``Q`` in bits (a scalar tensor differentiable in every ``bits``)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no quantised layer; call attach_quantizers first")
    return torch.stack([layer_size_bits(layer, q) for layer, q in layers.values()]).sum()


def float_weight_count(model: nn.Module) -> int:
    """``N``: the weights of the quantised layers in the float model (fixed at attach time)."""
    return sum(int(q.float_numel) for _, q in quantized_layers(model).values())


def size_loss(model: nn.Module, gamma: float) -> torch.Tensor:
    """``gamma * Q / N`` (add it to the task loss when not using the callback)."""
    return gamma * size_bits(model) / float_weight_count(model)


def add_size_grad(model: nn.Module, gamma: float) -> bool:
    """Add ``d(gamma Q / N)/d bits`` to every ``bits.grad`` (creating it if missing).

    Equivalent to having added :func:`size_loss` to the loss before ``backward``, but done once
    per optimizer step on unscaled gradients, so it is independent of gradient accumulation and
    AMP loss scaling.

    Returns:
        False (and nothing added) when a gradient or a ``bits`` value is not finite.
    """
    layers = quantized_layers(model)
    bits = [q.bits for _, q in layers.values()]
    if gamma == 0 or not bits:
        return True
    if not all(bool(torch.isfinite(b).all()) for b in bits):
        return False
    with torch.enable_grad():
        grads = torch.autograd.grad(size_loss(model, gamma), bits)
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        return False
    for b, g in zip(bits, grads):
        if b.grad is None:
            b.grad = g.detach().clone()
        else:
            b.grad.add_(g)
    return True
