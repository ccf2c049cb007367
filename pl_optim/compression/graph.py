"""Channel dependency analysis: which tensors share an output-channel index with which layers.

A *group* is a set of producer layers (conv/linear whose weight dim 0 is the channel) whose
channels are tied index by index (through residual additions), together with everything that
must be sliced with them: channel-wise modules on the way (BatchNorm, depthwise convs) and the
input dimension of every consumer (the next conv's dim 1, or — after ``Flatten`` — the block of
``H*W`` input features of a ``Linear`` that one channel becomes). Channel ``i`` of a group may go
only when it is dead in EVERY producer and the constant it leaves behind (bias, BatchNorm shift,
through the activations) is exactly 0 at every point a consumer or junction sees it, in both
train and eval mode.

The model is traced with ``torch.fx`` and the shapes propagated on one example input (in eval
mode, under ``no_grad``: no running statistic changes). Anything not understood freezes the
channels involved (they are kept) and is reported in :attr:`ChannelGraph.unsupported`; the
network output's channels are always frozen.

Example::

    graph = ChannelGraph(model, torch.randn(2, 1, 8, 8))
    plan = graph.removable(zero_rows(model, graph))   # group id -> channel indices to remove
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

#: chain step: ``f(v, train) -> v`` maps the per-channel constant a dead channel carries.
Step = Callable[[torch.Tensor, bool], torch.Tensor]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ZERO_ACT = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Hardtanh,
    nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Identity,
)
_ZERO_FN = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh, F.hardswish, F.hardtanh,
    F.mish, torch.nn.functional.tanh,
}
_ZERO_METHOD = {"relu", "relu_", "tanh", "contiguous", "clone"}
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ZERO_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_MAX_POOL_FN = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                F.adaptive_max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_ZERO_POOL_FN = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.dropout}
_REDUCE = {torch.mean, torch.amax, torch.sum}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}


@dataclass
class Consumer:
    """A layer reading a group's channels on its input dimension.

    ``segments`` are the space ids concatenated along its input channels (in order), ``block``
    the input features one channel becomes (``H*W`` after ``Flatten``; 1 for a conv)."""

    name: str
    segments: list[int]
    block: int


@dataclass
class ChannelGroup:
    """Producers tied index by index, what to slice with them, and the zero checks.

    Attributes:
        producers: names of conv/linear layers whose output channels (weight dim 0) these are.
        channelwise: names of BatchNorm / depthwise-conv modules sliced on the same channels.
        consumers: layers whose input features are these channels.
        checks: chains mapping a dead channel's constant to what a consumer or junction sees;
            the first step of a chain that starts at a producer is that producer's bias.
        frozen: why these channels must be kept (empty when removable).
    """

    producers: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    checks: list[tuple[Step, ...]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


@dataclass
class _Val:
    """A traced tensor whose channel dim (dim 1) is made of whole spaces, each with the chain of
    channel-wise steps applied since that space's last junction. ``block`` is set once the
    tensor was flattened to ``[N, C*block]`` features."""

    segs: list[tuple[int, tuple[Step, ...]]]
    block: int | None = None


class ChannelGraph:
    """Dependency analysis of a model's output channels (see the module docstring).

    Args:
        model: the network (a ``LightningModule`` works: its ``forward`` is traced).
        *example_args: one example input for ``model.forward`` (shapes only; any batch size).

    Raises:
        ValueError: the model cannot be traced with ``torch.fx`` (message carries the reason).
    """

    def __init__(self, model: nn.Module, *example_args) -> None:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - fx raises many types; report them uniformly
            raise ValueError(f"channel removal needs a torch.fx-traceable model: {type(exc).__name__}: {exc}") from exc
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_args)
        finally:
            for m, training in modes.items():
                m.training = training
        self.model = model
        self.modules = dict(model.named_modules())
        self.unsupported: list[str] = []
        self._parent: list[int] = []
        self._spaces: list[ChannelGroup] = []
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        self._shared = {name for name, n in calls.items() if n > 1}
        self._run(gm)
        self.groups = self._collect()

    # -- union-find over spaces ---------------------------------------------------------------
    def _new_space(self) -> int:
        self._parent.append(len(self._parent))
        self._spaces.append(ChannelGroup())
        return len(self._parent) - 1

    def _find(self, s: int) -> int:
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def _freeze(self, val: _Val | None, reason: str) -> None:
        if val is None:
            return
        for s, _ in val.segs:
            self._spaces[s].frozen.append(reason)
        if reason not in self.unsupported:
            self.unsupported.append(reason)

    def _close(self, val: _Val) -> None:
        """A junction or consumer: every incoming chain must leave exactly 0."""
        for s, chain in val.segs:
            self._spaces[s].checks.append(chain)

    # -- the walk -----------------------------------------------------------------------------
    def _run(self, gm: fx.GraphModule) -> None:
        vals: dict[fx.Node, _Val] = {}
        for node in gm.graph.nodes:
            tracked = [a for a in node.all_input_nodes if a in vals]
            shape = _shape(node)
            if node.op == "placeholder" or node.op == "get_attr":
                continue
            if node.op == "output":
                for a in tracked:
                    self._freeze(vals[a], "network output")
                continue
            out = None
            try:
                out = self._node(node, vals, tracked, shape)
            except _Unsupported as exc:
                for a in tracked:
                    self._freeze(vals[a], str(exc))
            if out is not None:
                vals[node] = out

    def _node(self, node: fx.Node, vals: dict, tracked: list, shape) -> _Val | None:
        desc = _describe(node, self.modules)
        if node.op == "call_module":
            mod = self.modules[node.target]
            if node.target in self._shared and isinstance(mod, (*_CONV, nn.Linear, *_BN)):
                raise _Unsupported(f"module {node.target} called more than once")
            src = vals.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(mod, _CONV):
                return self._conv(node, mod, src, shape)
            if isinstance(mod, nn.Linear):
                return self._linear(node, mod, src, shape)
            if src is None:
                if tracked:
                    raise _Unsupported(f"unsupported use of channels by {desc}")
                return None
            if len(tracked) != 1 or len(node.args) != 1 or node.kwargs:
                raise _Unsupported(f"unsupported use of channels by {desc}")
            if isinstance(mod, _BN):
                if src.block is not None:
                    raise _Unsupported(f"{desc} after flatten")
                for s, _ in src.segs:
                    self._spaces[s].channelwise.append(node.target)
                return _extend(src, _bn_step(mod))
            if isinstance(mod, _ZERO_ACT):
                return _extend(src, lambda v, t, m=mod: m(v))
            if isinstance(mod, _MAX_POOL):
                return _extend(src, _keep_const) if src.block is None else _refuse_after_flatten(src, desc)
            if isinstance(mod, _ZERO_POOL):
                return _extend(src, _keep_zero) if src.block is None or isinstance(mod, nn.Dropout) else _refuse_after_flatten(src, desc)
            if isinstance(mod, nn.Flatten):
                return self._flatten(node, src, shape, mod.start_dim, mod.end_dim, desc)
            raise _Unsupported(f"unsupported module {desc}")
        if not tracked:
            return None
        target = node.target
        if node.op == "call_function" and target in _ADD or node.op == "call_method" and target in ("add", "add_", "sub"):
            return self._add(node, vals, tracked, desc)
        if node.op == "call_function" and target in _MUL or node.op == "call_method" and target in ("mul", "mul_"):
            return self._mul(node, vals, tracked, desc)
        if node.op == "call_function" and target in (operator.truediv, torch.div) and len(tracked) == 1 \
                and node.args[0] is tracked[0] and isinstance(node.args[1], (int, float)) and node.args[1] != 0:
            k = float(node.args[1])
            return _extend(vals[tracked[0]], lambda v, t: v / k)
        if node.op == "call_function" and target in (torch.cat, torch.concat):
            return self._cat(node, vals, tracked, desc)
        if node.op == "call_method" and target == "size" or node.op == "call_function" and target is getattr:
            return None  # shape queries do not read channel values
        if len(tracked) != 1 or node.args[0] is not tracked[0]:
            raise _Unsupported(f"unsupported use of channels by {desc}")
        src = vals[tracked[0]]
        extra = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        if node.op == "call_function" and target in _ZERO_FN or node.op == "call_method" and target in _ZERO_METHOD:
            if extra:
                raise _Unsupported(f"unsupported use of channels by {desc}")
            fn, args, kwargs = target, node.args[1:], dict(node.kwargs)
            if node.op == "call_method":
                return _extend(src, lambda v, t: getattr(v, fn)(*args, **kwargs))
            return _extend(src, lambda v, t: fn(v, *args, **kwargs))
        if node.op == "call_function" and target in _MAX_POOL_FN and src.block is None:
            return _extend(src, _keep_const)
        if node.op == "call_function" and target in _ZERO_POOL_FN:
            return _extend(src, _keep_zero)
        if target in _REDUCE or target in ("mean", "amax", "sum") and node.op == "call_method":
            return self._reduce(node, src, desc)
        if target in (torch.flatten, "flatten", "view", "reshape"):
            return self._flatten(node, src, shape, None, None, desc)
        raise _Unsupported(f"unsupported op {desc}")

    def _conv(self, node: fx.Node, mod: nn.Module, src: _Val | None, shape) -> _Val:
        dw = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        if src is not None:
            if src.block is not None or len(node.args) != 1 or node.kwargs:
                raise _Unsupported(f"conv {node.target} on a flattened or extra input")
            if dw:
                for s, _ in src.segs:
                    self._spaces[s].channelwise.append(node.target)
                return _extend(src, _dw_step(mod))
            if mod.groups > 1:
                raise _Unsupported(f"grouped conv {node.target} (groups={mod.groups}, not depthwise)")
            self._add_consumer(node.target, src, 1)
        elif dw or mod.groups > 1:
            raise _Unsupported(f"grouped conv {node.target} on an untracked input")
        s = self._new_space()
        self._spaces[s].producers.append(node.target)
        return _Val([(s, (_bias_step(mod),))])

    def _linear(self, node: fx.Node, mod: nn.Linear, src: _Val | None, shape) -> _Val | None:
        if src is not None:
            if len(node.args) != 1 or node.kwargs or len(shape) != 2:
                raise _Unsupported(f"linear {node.target} on a non-2-D or extra input")
            self._add_consumer(node.target, src, src.block or 1)
        if shape is None or len(shape) != 2:
            s = self._new_space()
            self._spaces[s].frozen.append(f"linear {node.target} output is not [N, features]")
            return None
        s = self._new_space()
        self._spaces[s].producers.append(node.target)
        return _Val([(s, (_bias_step(mod),))])

    def _add_consumer(self, name: str, src: _Val, block: int) -> None:
        self._close(src)
        segs = [s for s, _ in src.segs]
        for s in segs:
            self._spaces[s].consumers.append(Consumer(name, segs, block))

    def _flatten(self, node, src: _Val, shape, start, end, desc) -> _Val:
        in_shape = _shape(node.args[0])
        if src.block is not None or in_shape is None or shape is None:
            raise _Unsupported(f"unsupported reshape {desc}")
        if start is not None and (start != 1 or end not in (-1, len(in_shape) - 1)):
            raise _Unsupported(f"flatten {desc} not from dim 1 to the end")
        if len(shape) != 2 or shape[0] != in_shape[0] or shape[1] != math.prod(in_shape[1:]):
            raise _Unsupported(f"reshape {desc} is not a flatten to [N, C*H*W]")
        self._close(src)
        return _Val([(s, ()) for s, _ in src.segs], block=math.prod(in_shape[2:]))

    def _reduce(self, node, src: _Val, desc) -> _Val:
        """``x.mean((2, 3))`` and friends over spatial dims only: channels stay on dim 1."""
        in_shape = _shape(node.args[0])
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else dims
        if src.block is not None or in_shape is None or not isinstance(dims, (tuple, list)) or any(
            not isinstance(d, int) or d % len(in_shape) < 2 for d in dims
        ) or set(node.kwargs) - {"dim", "keepdim"}:
            raise _Unsupported(f"{desc} over the batch or channel dim")
        name = getattr(node.target, "__name__", node.target)
        return _extend(src, _keep_zero if name == "sum" else _keep_const)

    def _add(self, node, vals, tracked, desc) -> _Val:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tracked) != 2 or len(tensors) != 2 or node.kwargs:
            raise _Unsupported(f"{desc} of channels with an untracked tensor or constant")
        a, b = vals[tracked[0]], vals[tracked[1]]
        if a.block != b.block or len(a.segs) != len(b.segs) or any(
            _size(self, sa) != _size(self, sb) for (sa, _), (sb, _) in zip(a.segs, b.segs)
        ):
            raise _Unsupported(f"{desc} of misaligned channel layouts")
        self._close(a)
        self._close(b)
        for (sa, _), (sb, _) in zip(a.segs, b.segs):
            ra, rb = self._find(sa), self._find(sb)
            if ra != rb:
                self._parent[rb] = ra
        return _Val([(sa, ()) for sa, _ in a.segs], a.block)

    def _mul(self, node, vals, tracked, desc) -> _Val:
        others = [a for a in node.args if not isinstance(a, fx.Node)]
        if len(tracked) == 1 and len(node.args) == 2 and len(others) == 1 and isinstance(others[0], (int, float)):
            k = float(others[0])
            return _extend(vals[tracked[0]], lambda v, t: v * k)
        raise _Unsupported(f"{desc} of channels by a tensor")

    def _cat(self, node, vals, tracked, desc) -> _Val:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        parts = node.args[0]
        if dim != 1 or not isinstance(parts, (list, tuple)) or not all(p in vals for p in parts):
            raise _Unsupported(f"{desc} not along dim 1 of tracked channels")
        if len({vals[p].block for p in parts}) != 1 or vals[parts[0]].block is not None:
            raise _Unsupported(f"{desc} of flattened tensors")
        segs = []
        for p in parts:
            self._close(vals[p])
            segs.extend((s, ()) for s, _ in vals[p].segs)
        return _Val(segs)

    # -- results ------------------------------------------------------------------------------
    def _collect(self) -> list[ChannelGroup]:
        roots: dict[int, ChannelGroup] = {}
        self.space_group: dict[int, int] = {}
        for s, sp in enumerate(self._spaces):
            r = self._find(s)
            g = roots.setdefault(r, ChannelGroup())
            g.producers += sp.producers
            g.channelwise += sp.channelwise
            g.checks += sp.checks
            g.frozen += sp.frozen
            for c in sp.consumers:
                if all(c is not d for d in g.consumers):
                    g.consumers.append(c)
        order = list(roots)
        for s in range(len(self._spaces)):
            self.space_group[s] = order.index(self._find(s))
        groups = [roots[r] for r in order]
        for g in groups:
            if not g.producers:
                g.frozen.append("no producer")
        return groups

    def group_size(self, index: int) -> int:
        """Current number of channels of group ``index`` (its first producer's output size)."""
        return output_size(self.modules[self.groups[index].producers[0]])

    def dead_in_all(self, dead: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Group index -> bool mask of channels dead in EVERY producer (unfrozen groups only)."""
        out = {}
        for i, g in enumerate(self.groups):
            if g.frozen or not all(p in dead for p in g.producers):
                continue
            mask = torch.ones(self.group_size(i), dtype=torch.bool)
            for p in g.producers:
                mask &= dead[p].detach().to("cpu", torch.bool)
            if mask.any():
                out[i] = mask
        return out

    def removable(self, dead: Mapping[str, torch.Tensor], atol: float = 0.0) -> dict[int, torch.Tensor]:
        """Channels that can go now, per group.

        Args:
            dead: producer name -> bool ``[C_out]``, True where that producer's channel is dead
                (its weight row is, and stays, 0). Producers absent from ``dead`` count as alive.
            atol: largest ``|constant|`` a dead channel may still carry at a consumer or junction
                (0: exactly function-preserving; a small value lets eval-mode BatchNorm running
                means that are still decaying towards 0 count as 0).

        Returns:
            group index -> sorted ``LongTensor`` of channel indices to remove (groups with
            nothing to remove are absent). At least one channel of every group is kept.
        """
        plan = {}
        for i, mask in self.dead_in_all(dead).items():
            with torch.no_grad():
                for chain in self.groups[i].checks:
                    for train in (True, False):
                        v = torch.zeros(mask.numel())
                        for step in chain:
                            v = step(v, train)
                        mask &= v.abs() <= atol
            if mask.all():
                mask[0] = False
            if mask.any():
                plan[i] = mask.nonzero().flatten()
        return plan


class _Unsupported(Exception):
    pass


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _size(graph: ChannelGraph, s: int) -> int:
    return output_size(graph.modules[graph._spaces[s].producers[0]]) if graph._spaces[s].producers else -1


def output_size(mod: nn.Module) -> int:
    """Output channels of a conv (``out_channels``) or linear layer (``out_features``)."""
    return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    return f"{getattr(node.target, '__name__', node.target)} ({node.name})"


def _extend(src: _Val, step: Step) -> _Val:
    return _Val([(s, (*chain, step)) for s, chain in src.segs], src.block)


def _refuse_after_flatten(src: _Val, desc: str) -> _Val:
    raise _Unsupported(f"{desc} after flatten")


def _keep_const(v: torch.Tensor, train: bool) -> torch.Tensor:
    return v


def _keep_zero(v: torch.Tensor, train: bool) -> torch.Tensor:
    """Zero stays zero; any other constant stops being constant (padding, dropout)."""
    return torch.where(v == 0, v, torch.full_like(v, float("nan")))


def _bias_step(mod: nn.Module) -> Step:
    def step(v: torch.Tensor, train: bool) -> torch.Tensor:
        return v + mod.bias.detach().float().cpu() if mod.bias is not None else v

    return step


def _dw_step(mod: nn.Module) -> Step:
    """Depthwise conv of a constant: 0 -> bias exactly; other constants vary at padded borders."""

    def step(v: torch.Tensor, train: bool) -> torch.Tensor:
        bias = mod.bias.detach().float().cpu() if mod.bias is not None else torch.zeros_like(v)
        w_zero = (mod.weight.detach().flatten(1) == 0).all(1).cpu()
        return torch.where((v == 0) | w_zero, bias, torch.full_like(v, float("nan")))

    return step


def _bn_step(mod: nn.Module) -> Step:
    """BatchNorm of a per-channel constant: in training mode the batch statistics normalise a
    constant 0 to exactly the shift ``beta`` (other constants only approximately, so they are
    treated as unknown); in eval mode ``(v - mean) / sqrt(var + eps) * gamma + beta``."""

    def step(v: torch.Tensor, train: bool) -> torch.Tensor:
        w = mod.weight.detach().float().cpu() if mod.affine else torch.ones_like(v)
        b = mod.bias.detach().float().cpu() if mod.affine else torch.zeros_like(v)
        if train or mod.running_mean is None:
            return torch.where(v == 0, b, torch.full_like(v, float("nan")))
        rm, rv = mod.running_mean.detach().float().cpu(), mod.running_var.detach().float().cpu()
        return (v - rm) / torch.sqrt(rv + mod.eps) * w + b

    return step


def zero_rows(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """Producer name -> bool ``[C_out]``: True where the (effective, e.g. quantised) weight row is all 0.

    This is the quantiser-free deadness test; with self-compression the caller ANDs it with
    the quantiser's own rule (a zero row whose bit depth is still positive may revive).
    """
    out = {}
    for g in graph.groups:
        for p in g.producers:
            w = graph.modules[p].weight.detach()
            out[p] = (w.flatten(1) == 0).all(1).cpu()
    return out
