"""Channel surgery that keeps ``nn.Parameter`` identity and the optimizer state in step.

Removing channel set ``R`` of a group (see :mod:`.graph`) keeps the indices ``K = [0, C) \\ R``:

* producers (conv/linear): ``weight[K]``, ``bias[K]`` and every per-channel tensor of their
  parametrizations (the quantiser's ``bits``/``exponent``);
* channel-wise modules: BatchNorm ``weight/bias/running_mean/running_var[K]``; a depthwise conv
  ``weight[K]``, ``bias[K]``, ``groups = in = out = |K|``;
* consumers: ``weight[:, K']`` where ``K'`` maps each kept channel to its input features
  (``offset + c * block + j``, ``j < block``; ``block = H*W`` after ``Flatten``).

Every slice is written into the SAME ``nn.Parameter`` object (``torch.utils.swap_tensors`` with
the sliced tensor, so autograd's per-tensor state starts afresh; see :func:`slice_parameter`),
and every optimizer state tensor shaped like the parameter (``momentum_buffer``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ...) and the gradient are sliced the same way; scalar state
(``step``) is kept. The optimizer therefore continues exactly as if the removed entries had never
existed: for element-wise optimizers the kept entries evolve identically.

The indices kept are tracked relative to the ORIGINAL full-size layers
(:attr:`ChannelRemover.kept`: layer name -> ``{"out": LongTensor, "in": LongTensor}``), so a
freshly built full-size model is brought to the same shapes in one call to :func:`apply_kept`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from pl_optim.compression.graph import ChannelGraph
from pl_optim.compression.quantizer import ChannelQuantizer

Kept = dict[str, dict[str, torch.Tensor]]


def slice_parameter(
    param: torch.Tensor, dim: int, index: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> None:
    """Keep ``index`` along ``dim`` of ``param`` in place (same object), its ``.grad`` and every
    optimizer state tensor of the same shape; scalar/differently shaped state is left alone.

    Args:
        param: an ``nn.Parameter`` or buffer.
        dim: the dimension to slice.
        index: ``LongTensor`` of the entries to keep (any device).
        optimizers: optimizers whose state for ``param`` must follow.
    """
    old_shape = param.shape
    idx = index.to(param.device)
    with torch.no_grad():
        if isinstance(param, nn.Parameter):
            new = nn.Parameter(param.detach().index_select(dim, idx).contiguous(), requires_grad=param.requires_grad)
            if param.grad is not None:
                new.grad = param.grad.index_select(dim, idx).contiguous()
            new.__dict__.update(param.__dict__)
            # swap rather than `.data =`: the Python object (optimizer key, module attribute)
            # stays while autograd starts afresh. `.data =` keeps the old gradient accumulator,
            # whose recorded shape breaks backward when something (DDP's reducer) holds on to it.
            # A graph that saved the tensor for backward forbids the swap; `.data =` then.
            try:
                torch.utils.swap_tensors(param, new)
            except RuntimeError:
                param.data = new.data
                param.grad = new.grad
        else:
            param.data = param.data.index_select(dim, idx).contiguous()
        for opt in optimizers:
            state = opt.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == old_shape and value.dim() > 0:
                    state[key] = value.index_select(dim, idx.to(value.device)).contiguous()
                elif torch.is_tensor(value) and value.dim() > 0:
                    warnings.warn(
                        f"optimizer state {key!r} of shape {tuple(value.shape)} does not match its parameter "
                        f"{tuple(old_shape)}; left unsliced",
                        stacklevel=2,
                    )


def _weight(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _per_channel(module: nn.Module) -> list[torch.Tensor]:
    """Tensors of the weight's parametrizations holding one entry per output channel."""
    if not parametrize.is_parametrized(module, "weight"):
        return []
    c_out = _weight(module).shape[0]
    out = []
    for p in module.parametrizations.weight:
        for t in list(p.parameters()) + list(p.buffers()):
            if t.dim() >= 1 and t.shape[0] == c_out:
                out.append(t)
    return out


def slice_module(
    module: nn.Module,
    out_keep: torch.Tensor | None = None,
    in_keep: torch.Tensor | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Keep output channels ``out_keep`` and/or input features ``in_keep`` of one module.

    Supports ``Conv1d/2d/3d`` (plain, or depthwise: then ``in_keep`` is ignored and ``groups``
    follows ``out_keep``), ``Linear`` and ``BatchNorm1d/2d/3d``; updates the size attributes.

    Raises:
        TypeError: another module type.
    """
    optimizers = list(optimizers)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if out_keep is not None:
            for t in (module.weight, module.bias, module.running_mean, module.running_var):
                if t is not None:
                    slice_parameter(t, 0, out_keep, optimizers)
            module.num_features = len(out_keep)
        return
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        raise TypeError(f"cannot slice a {type(module).__name__}; supported: Conv1d/2d/3d, Linear, BatchNorm")
    depthwise = isinstance(module, nn.Linear) is False and module.groups > 1
    if out_keep is not None:
        for t in [_weight(module), module.bias, *_per_channel(module)]:
            if t is not None:
                slice_parameter(t, 0, out_keep, optimizers)
        if isinstance(module, nn.Linear):
            module.out_features = len(out_keep)
        else:
            module.out_channels = len(out_keep)
            if depthwise:
                module.in_channels = module.groups = len(out_keep)
    if in_keep is not None and not depthwise:
        slice_parameter(_weight(module), 1, in_keep, optimizers)
        if isinstance(module, nn.Linear):
            module.in_features = len(in_keep)
        else:
            module.in_channels = len(in_keep)


def apply_kept(model: nn.Module, kept: Kept, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Bring a full-size ``model`` to the shapes recorded in ``kept`` (indices relative to the
    full-size layers), e.g. before loading a checkpoint taken after removals.

    Raises:
        ValueError: a layer in ``kept`` is missing from ``model`` or is not full size.
    """
    modules = dict(model.named_modules())
    for name, entry in kept.items():
        if name not in modules:
            raise ValueError(f"layer {name!r} of the removal record is not in the model")
        slice_module(modules[name], entry.get("out"), entry.get("in"), optimizers)


def _constants(graph: ChannelGraph, group: int) -> list[torch.Tensor]:
    """The per-channel constant terms of a group: producer biases, BatchNorm shifts, depthwise biases."""
    g = graph.groups[group]
    mods = [graph.modules[n] for n in g.producers + g.channelwise]
    return [m.bias for m in mods if getattr(m, "bias", None) is not None]


def shrink_constants(
    graph: ChannelGraph,
    dead: Mapping[int, torch.Tensor],
    amount: float,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> int:
    """Proximal L1 step on the constants dead channels still carry: ``c <- sign(c) max(|c| - amount, 0)``.

    Applied to the producer bias, BatchNorm shift and depthwise bias of every channel in
    ``dead`` (group index -> bool mask, e.g. :meth:`ChannelGraph.dead_in_all`), it is the
    proximal operator of ``amount * |c|`` — the paper's L1 term on the outputs of dead channels —
    and reaches exactly 0 in finite steps. The optimizer state entries of those constants
    (momentum, Adam moments) are zeroed too, so the optimizer's own momentum does not push them
    away from 0 again.

    Returns:
        The number of constants that are non-zero after the step.
    """
    optimizers = list(optimizers)
    left = 0
    with torch.no_grad():
        for gi, mask in dead.items():
            for c in _constants(graph, gi):
                m = mask.to(c.device)
                c[m] = torch.sign(c[m]) * (c[m].abs() - amount).clamp_min(0)
                left += int((c[m] != 0).sum())
                for opt in optimizers:
                    for value in opt.state.get(c, {}).values():
                        if torch.is_tensor(value) and value.shape == c.shape:
                            value[m.to(value.device)] = 0
    return left


_SLICEABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def match_shapes(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Shrink the layers of a full-size ``model`` to the shapes a ``state_dict`` saved after
    channel removal holds, so that ``model.load_state_dict(state_dict)`` fits.

    Only shapes matter here (the values are loaded right after): each layer keeps its first
    ``k`` channels. Quantiser parametrizations present in ``state_dict`` but not in ``model``
    are attached first (:func:`~pl_optim.compression.quantizer.attach_quantizers` layout).

    Returns:
        Names of the layers that were shrunk.
    """
    shrunk = []
    for name, module in model.named_modules():
        if not isinstance(module, _SLICEABLE):
            continue
        base = f"{prefix}{name}." if name else prefix
        if f"{base}parametrizations.weight.original" in state_dict and not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", ChannelQuantizer(module.weight))
        key = f"{base}parametrizations.weight.original" if parametrize.is_parametrized(module, "weight") else f"{base}weight"
        if key not in state_dict and isinstance(module, nn.modules.batchnorm._BatchNorm):
            key = f"{base}running_mean"
        if key not in state_dict:
            continue
        saved, current = state_dict[key].shape, (_weight(module) if key.endswith("weight") or "original" in key
                                                 else module.running_mean).shape
        if saved == current:
            continue
        out_keep = torch.arange(saved[0]) if saved[0] != current[0] else None
        in_keep = torch.arange(saved[1]) if len(saved) > 1 and saved[1] != current[1] else None
        slice_module(module, out_keep, in_keep)
        shrunk.append(name)
    return shrunk


class ChannelRemover:
    """Removes dead channels of a model, group by group, and remembers what it kept.

    Args:
        graph: the dependency analysis of the model (:class:`~.graph.ChannelGraph`).
        kept: a previous record (see :attr:`kept`) when the model already had removals.

    Attributes:
        kept: layer name -> ``{"out": LongTensor, "in": LongTensor}``, indices of the full-size
            layer that are still there (only for layers that lost something).
        original: layer name -> full-size ``(out, in)`` sizes of every sliceable layer.
    """

    def __init__(self, graph: ChannelGraph, kept: Kept | None = None) -> None:
        self.graph = graph
        self.kept: Kept = {k: dict(v) for k, v in (kept or {}).items()}

    def remove(
        self, plan: Mapping[int, torch.Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> dict[str, int]:
        """Remove channels ``plan[group]`` (local indices, as from ``graph.removable``).

        Returns:
            producer layer name -> number of output channels removed.
        """
        optimizers = list(optimizers)
        out_keep: dict[str, torch.Tensor] = {}
        sizes = {i: self.graph.group_size(i) for i in range(len(self.graph.groups))}
        keeps = {}
        for gi, drop in plan.items():
            mask = torch.ones(sizes[gi], dtype=torch.bool)
            mask[drop.cpu()] = False
            keeps[gi] = mask.nonzero().flatten()
            g = self.graph.groups[gi]
            for name in g.producers + g.channelwise:
                out_keep[name] = keeps[gi]
        in_keep: dict[str, torch.Tensor] = {}
        for gi in plan:
            for c in self.graph.groups[gi].consumers:
                if c.name in in_keep:
                    continue
                parts, offset = [], 0
                for s in c.segments:
                    g = self.graph.space_group[s]
                    n = sizes[g]
                    k = keeps.get(g, torch.arange(n))
                    feats = (offset + k[:, None] * c.block + torch.arange(c.block)[None, :]).flatten()
                    parts.append(feats)
                    offset += n * c.block
                in_keep[c.name] = torch.cat(parts)
        removed = {}
        for name in dict.fromkeys([*out_keep, *in_keep]):
            module = self.graph.modules[name]
            o, i = out_keep.get(name), in_keep.get(name)
            dw = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1
            if o is not None and not dw and not isinstance(module, nn.modules.batchnorm._BatchNorm):
                removed[name] = _weight(module).shape[0] - len(o)
            slice_module(module, o, i, optimizers)
            self._record(name, o, i)
        return removed

    def _record(self, name: str, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
        entry = self.kept.setdefault(name, {})
        for key, local in (("out", out_keep), ("in", in_keep)):
            if local is not None:
                entry[key] = entry[key][local] if key in entry else local.clone()
