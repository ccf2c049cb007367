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

import inspect
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from pl_optim.compression.graph import ChannelGraph
from pl_optim.compression.quantizer import ChannelQuantizer

Kept = dict[str, dict[str, torch.Tensor]]


def _state_rule(value, shape: torch.Size, dim: int) -> str | None:
    """How an optimizer state entry follows a slice of its parameter (``shape``) along ``dim``:
    ``"slice"`` (shaped like the parameter there), ``"keep"`` (a scalar, or reduced along ``dim``:
    size 1 there and broadcasting against the parameter, e.g. Adafactor's factored ``row_var`` /
    ``col_var``), or None (not shaped so that it can follow)."""
    if not torch.is_tensor(value) or value.dim() == 0:
        return "keep"
    if value.dim() != len(shape) or any(v not in (p, 1) for v, p in zip(value.shape, shape)):
        return None
    return "slice" if value.shape[dim] == shape[dim] else "keep"


def _refusal(optimizer: torch.optim.Optimizer, key: str, value: torch.Tensor, shape: torch.Size) -> str:
    return (f"{type(optimizer).__name__} keeps optimizer state {key!r} of shape {tuple(value.shape)} for a parameter "
            f"of shape {tuple(shape)}: channel removal can slice only state shaped like its parameter (or size 1 "
            "along the removed dim, broadcasting against it) and scalars; use another optimizer or turn removal off")


def _check_state(param: torch.Tensor, dim: int, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    for opt in optimizers:
        for key, value in (opt.state.get(param) or {}).items():
            if _state_rule(value, param.shape, dim) is None:
                raise ValueError(_refusal(opt, key, value, param.shape))


def _probe_state(
    optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor
) -> tuple[dict, torch.Size] | None:
    """The state ``type(optimizer)`` creates for a small parameter of ``param``'s rank after one step
    (with ``group``'s settings), or None when such an optimizer cannot be built or stepped here."""
    shape = (2, 3, 4, 5, 6)[: param.dim()]
    dummy = nn.Parameter(torch.zeros(shape, dtype=param.dtype))
    try:
        names = inspect.signature(type(optimizer).__init__).parameters
        probe = type(optimizer)([dummy], **{k: v for k, v in group.items() if k in names and k != "params"})
        dummy.grad = torch.ones_like(dummy)
        probe.step()
    except Exception:  # noqa: BLE001 - a custom optimizer that needs more than its param-group settings
        return None
    return dict(probe.state.get(dummy) or {}), dummy.shape


def check_optimizer_state_sliceable(
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer], params: Iterable[torch.Tensor] | None = None
) -> None:
    """Refuse, before any change, an optimizer whose per-parameter state channel removal cannot slice.

    Every state tensor must be shaped like its parameter, be a scalar (``step``), or have size 1
    along a dimension the surgery slices (0 and 1) while matching the parameter elsewhere (then it
    is kept along that dimension: torch's ``Adafactor`` factored ``row_var``/``col_var``). A
    parameter without state yet is checked on the state ``type(optimizer)`` creates for a small
    parameter of the same rank after one step (skipped when that optimizer cannot be built from
    its param-group settings alone).

    Args:
        optimizers: one optimizer or several.
        params: only these parameters (default: every parameter of the optimizers).

    Raises:
        ValueError: naming the optimizer class and the state key.
        TypeError: ``optimizers`` holds something else than optimizers.

    Example::

        check_optimizer_state_sliceable(opt)   # at setup, before training
    """
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    bad = [o for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
    if bad:
        raise TypeError(f"`optimizers` must be torch.optim.Optimizer objects, got {type(bad[0]).__name__}")
    wanted = None if params is None else {id(p) for p in params}
    probes: dict[tuple[int, int, int], tuple[dict, torch.Size] | None] = {}
    for opt in optimizers:
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                if wanted is not None and id(p) not in wanted or p.dim() == 0:
                    continue
                state, shape = opt.state.get(p), p.shape
                if not state:
                    key = (id(opt), gi, p.dim())
                    if key not in probes:
                        probes[key] = _probe_state(opt, group, p)
                    if probes[key] is None:
                        continue
                    state, shape = probes[key]
                for key, value in state.items():
                    for dim in range(min(2, len(shape))):
                        if _state_rule(value, shape, dim) is None:
                            raise ValueError(_refusal(opt, key, value, shape))


def slice_parameter(
    param: torch.Tensor, dim: int, index: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> None:
    """Keep ``index`` along ``dim`` of ``param`` in place (same object), its ``.grad`` and every
    optimizer state tensor shaped like it; scalar state is kept, and so is state of size 1 along
    ``dim`` that broadcasts against the parameter (Adafactor's factored second moments).

    Args:
        param: an ``nn.Parameter`` or buffer.
        dim: the dimension to slice.
        index: ``LongTensor`` of the entries to keep (any device).
        optimizers: optimizers whose state for ``param`` must follow.

    Raises:
        ValueError: an optimizer state that cannot follow (checked before anything changes).
    """
    optimizers = list(optimizers)
    _check_state(param, dim, optimizers)
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
            for key, value in (state or {}).items():
                if _state_rule(value, old_shape, dim) == "slice":
                    state[key] = value.index_select(dim, idx.to(value.device)).contiguous()


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


def _grouped(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1


def _slices(
    module: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """``(tensor, dim, index)`` of every slice :func:`slice_module` makes."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        tensors = (module.weight, module.bias, module.running_mean, module.running_var)
        return [(t, 0, out_keep) for t in tensors if t is not None and out_keep is not None]
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        raise TypeError(f"cannot slice a {type(module).__name__}; supported: Conv1d/2d/3d, Linear, BatchNorm")
    out = []
    if out_keep is not None:
        out += [(t, 0, out_keep) for t in [_weight(module), module.bias, *_per_channel(module)] if t is not None]
    if in_keep is not None and not _grouped(module):
        out.append((_weight(module), 1, in_keep))
    return out


def _resize(module: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
    """Update the size attributes after :func:`_slices`."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if out_keep is not None:
            module.num_features = len(out_keep)
    elif isinstance(module, nn.Linear):
        module.out_features = len(out_keep) if out_keep is not None else module.out_features
        module.in_features = len(in_keep) if in_keep is not None else module.in_features
    elif _grouped(module):
        if out_keep is not None:  # whole conv groups (in == out): the weight keeps its dim 1
            module.out_channels = module.in_channels = len(out_keep)
            module.groups = len(out_keep) // int(_weight(module).shape[1])
    else:
        module.out_channels = len(out_keep) if out_keep is not None else module.out_channels
        module.in_channels = len(in_keep) if in_keep is not None else module.in_channels


def slice_module(
    module: nn.Module,
    out_keep: torch.Tensor | None = None,
    in_keep: torch.Tensor | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Keep output channels ``out_keep`` and/or input features ``in_keep`` of one module.

    Supports ``Conv1d/2d/3d`` (plain; depthwise or grouped with ``in == out``: then ``in_keep`` is
    ignored, ``out_keep`` must hold whole conv groups, and ``groups`` follows), ``Linear`` and
    ``BatchNorm1d/2d/3d``; updates the size attributes.

    Raises:
        TypeError: another module type.
        ValueError: an optimizer state that cannot follow (before anything changes).
    """
    optimizers = list(optimizers)
    slices = _slices(module, out_keep, in_keep)
    for t, dim, _ in slices:
        _check_state(t, dim, optimizers)
    for t, dim, index in slices:
        slice_parameter(t, dim, index, optimizers)
    _resize(module, out_keep, in_keep)


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


def _constants(graph: ChannelGraph, group: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-channel constant terms of a group, each with the positions of the group's channels
    in it (``[repeats, group_size]``): producer biases, BatchNorm shifts, depthwise/grouped-conv biases.
    Gates are not constants of the group: their outputs multiply it."""
    g = graph.groups[group]
    out = []
    for name in g.producers + g.channelwise:
        bias = getattr(graph.modules[name], "bias", None)
        if bias is not None:
            pos = graph.positions(name, group) if name in g.channelwise else torch.arange(len(bias))[None]
            out.append((bias, pos))
    return out


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
            for c, pos in _constants(graph, gi):
                idx = pos[:, mask.cpu()].flatten().to(c.device)
                c[idx] = torch.sign(c[idx]) * (c[idx].abs() - amount).clamp_min(0)
                left += int((c[idx] != 0).sum())
                for opt in optimizers:
                    for value in opt.state.get(c, {}).values():
                        if torch.is_tensor(value) and value.shape == c.shape:
                            value[idx.to(value.device)] = 0
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

        Every optimizer state that must follow is checked first: on a refusal nothing changes.

        Returns:
            producer (and gate) layer name -> number of output channels removed.

        Raises:
            ValueError: an optimizer state the surgery cannot slice (naming optimizer and key).
        """
        optimizers = list(optimizers)
        graph = self.graph
        sizes: dict[int, int] = {}

        def size(gi: int) -> int:
            if gi not in sizes:
                sizes[gi] = graph.group_size(gi)
            return sizes[gi]

        keeps = {}
        for gi, drop in plan.items():
            mask = torch.ones(size(gi), dtype=torch.bool)
            mask[drop.cpu()] = False
            keeps[gi] = mask.nonzero().flatten()

        def along(segments: list[int], block: int) -> torch.Tensor:
            parts, offset = [], 0
            for s in segments:
                g = graph.space_group[s]
                n, k = size(g), keeps.get(g, torch.arange(size(g)))
                parts.append((offset + k[:, None] * block + torch.arange(block)[None, :]).flatten())
                offset += n * block
            return torch.cat(parts)

        out_keep: dict[str, torch.Tensor] = {}
        in_keep: dict[str, torch.Tensor] = {}
        producers: set[str] = set()
        for gi in plan:
            g = graph.groups[gi]
            for name in g.producers + g.channelwise + g.gates:
                if name in out_keep:
                    continue
                segments = graph._segments.get(name)
                out_keep[name] = along(segments, 1) if segments is not None else keeps[gi]
                if segments is None:
                    producers.add(name)
            for c in g.consumers:
                if c.name not in in_keep:
                    in_keep[c.name] = along(c.segments, c.block)
        names = list(dict.fromkeys([*out_keep, *in_keep]))
        for name in names:  # validate every state first: a refusal leaves model and optimizers untouched
            for t, dim, _ in _slices(graph.modules[name], out_keep.get(name), in_keep.get(name)):
                _check_state(t, dim, optimizers)
        removed = {}
        for name in names:
            module = graph.modules[name]
            o, i = out_keep.get(name), in_keep.get(name)
            if name in producers:
                removed[name] = _weight(module).shape[0] - len(o)
            slice_module(module, o, i, optimizers)
            self._record(name, o, i)
        return removed

    def _record(self, name: str, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
        entry = self.kept.setdefault(name, {})
        for key, local in (("out", out_keep), ("in", in_keep)):
            if local is not None:
                entry[key] = entry[key][local] if key in entry else local.clone()
