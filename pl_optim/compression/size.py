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

**Compute-weighted term** (an extension, not in the paper): with ``P_l`` the output positions per
sample of layer ``l`` (``H_out * W_out`` for a 2-d conv, 1 for a ``Linear`` on ``[N, F]``), a layer's
multiply-accumulates per sample are ``P_l N_l`` and ``P_l Q_l`` its bit-MACs, so

    C = sum_l P_l Q_l / sum_l P_l N_l

is the mean bit depth per float MAC. Adding ``compute_gamma * C`` to the loss weighs every layer by
how often its weights are used, not by how many there are: early layers at high resolution hold
few weights but most of the compute, and the weight-count size ``Q / N`` hardly presses on them.

**Column cost** (an extension, not in the paper; needs channel removal's dependency graph,
:class:`~pl_optim.compression.graph.ChannelGraph`): ``Q`` charges a channel only for its own weight
row, but removing channel ``j`` of a group also removes the input columns of ``j`` in every
consumer. With ``S_j = sum_c w_c K_c sum_{f in cols_c(j)} sum_{i reads f} relu(b_i^c)`` the bits the
consumers ``c`` hold for ``j`` (``w_c = gamma / N + compute_gamma * P_c / sum_l P_l N_l``: the same
weights as the two terms above), every producer ``p`` of the group gets the surrogate

    E = sum_j S_j / |producers| * relu(b_j^p) / max(b_j^p, 1)        (S_j and the divisor without gradient)

so ``dE/db_j^p = S_j / (|producers| max(b_j^p, 1))``: the consumers' bits of the channel spread over the
bits the channel still has to shed before it dies (a channel is removed only once dead in every
producer). Without it a first conv (1 input channel, 9 weights a row) is barely pressed although each
of its channels holds a column of the next, much larger, layer. Frozen groups (kept channels) and
producers or consumers without a quantiser are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from pl_optim.compression.quantizer import ChannelQuantizer, quantized_layers

if TYPE_CHECKING:
    from pl_optim.compression.graph import ChannelGraph

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


def _layer_sizes(model: nn.Module) -> dict[str, tuple[torch.Tensor, ChannelQuantizer]]:
    """Quantised layer name -> ``(Q_l, quantizer)``; each ``Q_l`` computed once (it quantises the
    layer's weight), so several terms can share it."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no quantised layer; call attach_quantizers first")
    return {name: (layer_size_bits(layer, q), q) for name, (layer, q) in layers.items()}


def _total(sizes: Mapping[str, tuple[torch.Tensor, ChannelQuantizer]]) -> torch.Tensor:
    return torch.stack([size for size, _ in sizes.values()]).sum()


def size_bits(model: nn.Module) -> torch.Tensor:
    """Network size ``Q`` in bits (a scalar tensor differentiable in every ``bits``)."""
    return _total(_layer_sizes(model))


def float_weight_count(model: nn.Module) -> int:
    """``N``: the weights of the quantised layers in the float model (fixed at attach time)."""
    return sum(int(q.float_numel) for _, q in quantized_layers(model).values())


def size_loss(model: nn.Module, gamma: float) -> torch.Tensor:
    """``gamma * Q / N`` (add it to the task loss when not using the callback)."""
    return gamma * size_bits(model) / float_weight_count(model)


def output_positions(layer: nn.Module, output: torch.Tensor) -> int:
    """``P``: output positions per sample and channel of a conv (``[N, C, *spatial]``) or linear
    (``[N, ..., F]``) layer, from one of its outputs."""
    if isinstance(layer, nn.Linear):
        return output.numel() // max(output.shape[0] * output.shape[-1], 1)
    return output[0, 0].numel()


class OutputPositions:
    """Record ``P_l`` (:func:`output_positions`) of every quantised layer of ``model`` on its next forward
    (forward hooks; the output is unchanged), for :func:`compute_size_loss` / :func:`add_size_grad`.

    Attributes:
        positions: layer name -> ``P_l`` (filled by the next forward; empty before).

    Example::

        recorder = OutputPositions(net)
        net(x0)
        recorder.remove()
        add_size_grad(net, gamma, compute_gamma, recorder.positions)
    """

    def __init__(self, model: nn.Module) -> None:
        self.positions: dict[str, int] = {}
        self._names = list(quantized_layers(model))
        self._handles = [
            layer.register_forward_hook(lambda m, a, y, n=name: self._record(m, y, n))
            for name, (layer, _) in quantized_layers(model).items()
        ]

    def _record(self, module: nn.Module, output, name: str) -> None:
        if torch.is_tensor(output):
            self.positions.setdefault(name, output_positions(module, output))

    @property
    def missing(self) -> list[str]:
        """Quantised layers that did not run in the forward(s) seen so far."""
        return sorted(set(self._names) - set(self.positions))

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks (the positions stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def compute_size_loss(model: nn.Module, gamma: float, positions: Mapping[str, int]) -> torch.Tensor:
    """``gamma * sum_l P_l Q_l / sum_l P_l N_l`` over the quantised layers named in ``positions``
    (layer name -> ``P_l``, see :func:`output_positions`); differentiable in ``bits``."""
    return _compute_term(_layer_sizes(model), gamma, positions)


def _compute_term(sizes: Mapping[str, tuple[torch.Tensor, ChannelQuantizer]], gamma: float,
                  positions: Mapping[str, int]) -> torch.Tensor:
    named = [n for n in sizes if positions.get(n)]
    if not named:
        raise ValueError("`positions` names no quantised layer of the model")
    bit_macs = torch.stack([positions[n] * sizes[n][0] for n in named]).sum()
    return gamma * bit_macs / sum(positions[n] * int(sizes[n][1].float_numel) for n in named)


def input_feature_bits(layer: nn.Module, quantizer: ChannelQuantizer) -> torch.Tensor:
    """``[C_in]`` (input features of the layer's weight): ``K * sum_i relu(b_i)`` over the rows ``i`` that
    read each input feature (all rows; the rows of its group in a grouped conv). No gradient."""
    with torch.no_grad():
        g = groups_of(layer)
        rows = torch.relu(quantizer.bits).reshape(g, -1).sum(1)  # [G]
        per_group = layer.parametrizations.weight.original.shape[1]
        return kernel_area(layer) * rows.repeat_interleave(per_group)


def column_cost_loss(model: nn.Module, graph: ChannelGraph, gamma: float, compute_gamma: float = 0.0,
                     positions: Mapping[str, int] | None = None) -> torch.Tensor:
    """The column-cost surrogate ``E`` (module docstring), differentiable in the producers' ``bits``;
    ``graph`` must describe ``model`` as it is now (e.g. ``ChannelRemoval.graph``)."""
    layers = quantized_layers(model)
    n = float_weight_count(model)
    positions = (positions or {}) if compute_gamma else {}
    pn = sum(positions[name] * int(layers[name][1].float_numel) for name in layers if positions.get(name))
    terms = []
    for index, group in enumerate(graph.groups):
        if group.frozen or not all(p in layers for p in group.producers):
            continue
        cost = None
        for name, cols in graph.consumer_columns(index):
            if name not in layers:
                continue
            w = gamma / n + (compute_gamma * positions[name] / pn if positions.get(name) else 0.0)
            if w:
                bits = input_feature_bits(*layers[name])
                add = w * bits[cols.to(bits.device)].sum(1)
                cost = add if cost is None else cost + add
        if cost is None:
            continue
        for p in group.producers:
            b = layers[p][1].bits
            terms.append((cost / len(group.producers) * torch.relu(b) / b.detach().clamp(min=1.0)).sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def add_size_grad(model: nn.Module, gamma: float, compute_gamma: float = 0.0,
                  positions: Mapping[str, int] | None = None, graph: ChannelGraph | None = None,
                  column_cost: float = 1.0) -> bool:
    """Add ``d(gamma Q / N + compute_gamma C)/d bits`` to every ``bits.grad`` (creating it if
    missing); the second term only when ``positions`` is given (:func:`compute_size_loss`); with
    ``graph``, also ``column_cost`` times the column cost's ``dE/d bits`` (:func:`column_cost_loss`).

    Equivalent to having added :func:`size_loss` (and :func:`compute_size_loss`) to the loss
    before ``backward``, but done once per optimizer step on unscaled gradients, so it is
    independent of gradient accumulation and AMP loss scaling.

    Returns:
        False (and nothing added) when a gradient or a ``bits`` value is not finite.
    """
    layers = quantized_layers(model)
    bits = [q.bits for _, q in layers.values()]
    compute = bool(compute_gamma and positions)
    if gamma == 0 and not compute or not bits:
        return True
    if not all(bool(torch.isfinite(b).all()) for b in bits):
        return False
    with torch.enable_grad():
        sizes = _layer_sizes(model)  # once per step for both terms
        loss = gamma * _total(sizes) / float_weight_count(model)  # = size_loss(model, gamma)
        if compute:
            loss = loss + _compute_term(sizes, compute_gamma, positions)
        if graph is not None and column_cost:
            loss = loss + column_cost * column_cost_loss(model, graph, gamma, compute_gamma, positions)
        grads = torch.autograd.grad(loss, bits)
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        return False
    for b, g in zip(bits, grads):
        if b.grad is None:
            b.grad = g.detach().clone()
        else:
            b.grad.add_(g)
    return True
