"""Channel dependency analysis: which tensors share an output-channel index with which layers.

A *group* is a set of producer layers (conv/linear whose weight dim 0 is the channel) whose
channels are tied index by index (through residual additions), together with everything that
must be sliced with them: channel-wise modules on the way (BatchNorm — also after a
concatenation, on its segment —, depthwise convs, grouped convs with as many outputs as inputs,
whole conv groups at a time), the *gates* (the layers computing a per-channel factor that
multiplies these channels: the squeeze-excitation pattern ``x * sigmoid(fc2(relu(fc1(pool(x)))))``)
and the input dimension of every consumer (the next conv's dim 1, a ``Linear``'s input features —
also on channels-last tensors —, or — after ``Flatten`` — the block of ``H*W`` input features of a
``Linear`` that one channel becomes). Channel ``i`` of a group may go only when it is dead in
EVERY producer (gates need not be dead: ``0 * g = 0``) and the constant it leaves behind (bias,
BatchNorm shift, through the activations) is exactly 0 at every point a consumer or junction
sees it, in both train and eval mode.

The model is traced with ``torch.fx`` and the shapes propagated on one example input (in eval
mode, under ``no_grad``: no running statistic changes). Every traced node is classified by
:func:`~pl_optim.compression.ops.op_kind` (the operator tables shared with
:mod:`~pl_optim.compression.inference`) and handled by the method of that kind (one dispatch
table, ``_HANDLERS``). Anything not understood freezes the channels involved (they are kept)
and is reported once per pattern in :attr:`ChannelGraph.unsupported`, with the places; the
network output's channels are always frozen.

Example::

    graph = ChannelGraph(model, torch.randn(2, 1, 8, 8))
    plan = graph.removable(zero_rows(model, graph))   # group id -> channel indices to remove
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pl_optim.compression.ops import SUB_FUNCTIONS, describe, op_kind

#: chain step: ``f(v, train) -> v`` maps the per-channel constant a dead channel carries.
Step = Callable[[torch.Tensor, bool], torch.Tensor]
NETWORK_OUTPUT = "network output"


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
        channelwise: names of BatchNorm / depthwise- or grouped-conv modules sliced on the same
            channels (:meth:`ChannelGraph.positions` says where, after a concatenation).
        consumers: layers whose input features are these channels.
        checks: chains mapping a dead channel's constant to what a consumer or junction sees;
            the first step of a chain that starts at a producer is that producer's bias.
        frozen: why these channels must be kept (empty when removable).
        gates: layers (producers and channel-wise modules) of per-channel gates multiplying these
            channels: sliced with them, never required dead, their constants never touched.
    """

    producers: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    checks: list[tuple[Step, ...]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)


@dataclass
class _Space:
    """The channels of one producer's output, before union into groups."""

    size: int
    group: ChannelGroup = field(default_factory=ChannelGroup)
    gate: bool = False  # multiplies another space's channels (see ChannelGraph._mul)
    joined: bool = False  # tied to another space by a sum


@dataclass
class _Val:
    """A traced tensor whose channel dim ``cdim`` is made of whole spaces, each with the chain of
    channel-wise steps applied since that space's last junction. ``block`` is set once the
    tensor was flattened to ``[N, C*block]`` features."""

    segs: list[tuple[int, tuple[Step, ...]]]
    block: int | None = None
    cdim: int = 1


@dataclass
class _Opaque:
    """The output of an unsupported op: whatever it meets is frozen for the same reason."""

    pattern: str


class _Unsupported(Exception):
    def __init__(self, pattern: str, place: str) -> None:
        super().__init__(pattern)
        self.pattern, self.place = pattern, place


class ChannelGraph:
    """Dependency analysis of a model's output channels (see the module docstring).

    Args:
        model: the network (a ``LightningModule`` works: its ``forward`` is traced).
        *example_args: one example input for ``model.forward`` (shapes only; any batch size).

    Attributes:
        groups: the :class:`ChannelGroup` list (group index = position).
        space_group: space id (of :attr:`Consumer.segments`) -> group index.
        unsupported: one message per pattern that keeps channels, naming where
            (``"network output"`` is always the entry for the output's channels).

    Raises:
        ValueError: the model cannot be traced with ``torch.fx``, or fails on the example input
            (the message carries the reason; the model is left as it was).
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
        except Exception as exc:  # noqa: BLE001 - whatever the model raises on this input
            raise ValueError(f"channel removal could not run the example input through the model: "
                             f"{type(exc).__name__}: {exc}") from exc
        finally:
            for m, training in modes.items():
                m.training = training
        self.model = model
        self.modules = dict(model.named_modules())
        self._patterns: dict[str, list[str]] = {}
        self._parent: list[int] = []
        self._spaces: list[_Space] = []
        #: channel-wise module -> the spaces along its channels, in order
        self._segments: dict[str, list[int]] = {}
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        self._shared = {name for name, n in calls.items() if n > 1}
        self._run(gm)
        self.groups = self._collect()

    @property
    def unsupported(self) -> list[str]:
        out = []
        for pattern, places in self._patterns.items():
            if pattern == NETWORK_OUTPUT or not places:
                out.append(pattern)
            else:
                more = f" (and {len(places) - 1} more)" if len(places) > 1 else ""
                out.append(f"{pattern}: {places[0]}{more}")
        return out

    # -- union-find over spaces ---------------------------------------------------------------
    def _new_space(self, size: int) -> int:
        self._parent.append(len(self._parent))
        self._spaces.append(_Space(size))
        return len(self._parent) - 1

    def _find(self, s: int) -> int:
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[rb] = ra

    def _note(self, pattern: str, place: str | None) -> None:
        places = self._patterns.setdefault(pattern, [])
        if place is not None and place not in places:
            places.append(place)

    def _freeze(self, val: _Val, pattern: str, place: str | None = None) -> None:
        for s, _ in val.segs:
            self._spaces[s].group.frozen.append(pattern)
        self._note(pattern, place)

    def _close(self, val: _Val) -> None:
        """A junction or consumer: every incoming chain must leave exactly 0."""
        for s, chain in val.segs:
            self._spaces[s].group.checks.append(chain)

    def _space_size(self, s: int) -> int:
        producers = self._spaces[s].group.producers
        return output_size(self.modules[producers[0]]) if producers else self._spaces[s].size

    # -- the walk -----------------------------------------------------------------------------
    def _run(self, gm: fx.GraphModule) -> None:
        vals: dict[fx.Node, _Val | _Opaque] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            tracked = [a for a in node.all_input_nodes if isinstance(vals.get(a), _Val)]
            if node.op == "output":
                for a in tracked:
                    self._freeze(vals[a], NETWORK_OUTPUT)
                continue
            kind = op_kind(node, self.modules)
            opaque = [vals[a] for a in node.all_input_nodes if isinstance(vals.get(a), _Opaque)]
            if opaque and kind not in ("conv", "linear", "shape"):
                for a in tracked:  # frozen for the reason that made the other input opaque
                    self._freeze(vals[a], opaque[0].pattern)
                vals[node] = opaque[0]
                continue
            try:
                out = self._node(node, kind, vals, tracked)
            except _Unsupported as exc:
                for a in tracked:
                    self._freeze(vals[a], exc.pattern, exc.place)
                out = _Opaque(exc.pattern) if tracked else None
            if out is not None:
                vals[node] = out

    def _node(self, node: fx.Node, kind: str | None, vals: dict, tracked: list) -> _Val | None:
        if node.op == "call_module" and node.target in self._shared and kind in ("conv", "linear", "batchnorm"):
            raise _Unsupported("a layer called more than once", node.target)
        handler = _HANDLERS.get(kind)
        if handler is None:
            if not tracked:
                return None
            what = "module" if node.op == "call_module" else "op"
            raise _Unsupported(f"unsupported {what} {_name(node, self.modules)}", describe(node, self.modules))
        if kind not in ("conv", "linear") and not tracked:
            return None
        return handler(self, node, vals, tracked)

    def _src(self, node: fx.Node, vals: dict, tracked: list) -> _Val:
        """The one tracked input, which must be the first argument; the others are constants."""
        extra = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)
                 and _shape(a) is not None and len(_shape(a)) > 0]
        if len(tracked) != 1 or not node.args or node.args[0] is not tracked[0] or extra:
            raise _Unsupported(f"{_name(node, self.modules)} of channels with another tensor", describe(node, self.modules))
        return vals[tracked[0]]

    def _channelwise(self, name: str, src: _Val) -> None:
        self._segments[name] = [s for s, _ in src.segs]
        for s in dict.fromkeys(self._segments[name]):
            self._spaces[s].group.channelwise.append(name)

    def _produce(self, name: str, mod: nn.Module, cdim: int) -> _Val:
        s = self._new_space(output_size(mod))
        self._spaces[s].group.producers.append(name)
        return _Val([(s, (_bias_step(mod),))], cdim=cdim)

    def _add_consumer(self, name: str, src: _Val, block: int) -> None:
        self._close(src)
        segs = [s for s, _ in src.segs]
        consumer = Consumer(name, segs, block)
        for s in dict.fromkeys(segs):
            self._spaces[s].group.consumers.append(consumer)

    # -- handlers (one per op kind, see _HANDLERS) ---------------------------------------------
    def _conv(self, node, vals, tracked) -> _Val:
        mod, place = self.modules[node.target], node.target
        src = vals.get(node.args[0]) if node.args else None
        src = src if isinstance(src, _Val) else None
        if tracked and (src is None or len(tracked) != 1 or len(node.args) != 1 or node.kwargs):
            raise _Unsupported("conv with extra tensor inputs", place)
        if src is not None and (src.block is not None or src.cdim != 1):
            raise _Unsupported("conv on a flattened or channels-last input", place)
        if mod.groups > 1:
            if src is None:
                raise _Unsupported("grouped conv on an input whose channels are not followed", place)
            if mod.in_channels != mod.out_channels:
                raise _Unsupported("grouped conv with different input and output channel counts", place)
            if len(src.segs) != 1 and mod.groups != mod.in_channels:
                raise _Unsupported("grouped (not depthwise) conv over a concatenation", place)
            self._channelwise(node.target, src)
            return _extend_each(src, lambda k: _grouped_step(self, node.target, k))
        if src is not None:
            self._add_consumer(node.target, src, 1)
        return self._produce(node.target, mod, 1)

    def _linear(self, node, vals, tracked) -> _Val:
        mod, shape = self.modules[node.target], _shape(node)
        src = vals.get(node.args[0]) if node.args else None
        src = src if isinstance(src, _Val) else None
        if tracked and (src is None or len(tracked) != 1 or len(node.args) != 1 or node.kwargs):
            raise _Unsupported("linear with extra tensor inputs", node.target)
        if shape is None or len(shape) < 2:
            raise _Unsupported("linear on an input without a batch dim", node.target)
        if src is not None:
            if src.cdim != len(shape) - 1:
                raise _Unsupported("linear over a dim that is not the channel dim", node.target)
            self._add_consumer(node.target, src, src.block or 1)
        return self._produce(node.target, mod, len(shape) - 1)

    def _batchnorm(self, node, vals, tracked) -> _Val:
        src = self._src(node, vals, tracked)
        if src.block is not None or src.cdim != 1:
            raise _Unsupported("BatchNorm after flatten or on channels-last tensors", describe(node, self.modules))
        self._channelwise(node.target, src)
        return _extend_each(src, lambda k: _bn_step(self, node.target, k))

    def _elementwise(self, node, vals, tracked) -> _Val:
        src = self._src(node, vals, tracked)
        args, kwargs, target = node.args[1:], dict(node.kwargs), node.target
        if node.op == "call_module":
            mod = self.modules[target]
            return _extend(src, lambda v, t: mod(v))
        if node.op == "call_method":
            return _extend(src, lambda v, t: getattr(v, target)(*args, **kwargs))
        return _extend(src, lambda v, t: target(v, *args, **kwargs))

    def _pool(self, node, vals, tracked, step: Step) -> _Val:
        src = self._src(node, vals, tracked)
        if src.block is not None or src.cdim != 1:
            raise _Unsupported("pooling after flatten or on channels-last tensors", describe(node, self.modules))
        return _extend(src, step)

    def _const_pool(self, node, vals, tracked) -> _Val:
        return self._pool(node, vals, tracked, _keep_const)

    def _zero_pool(self, node, vals, tracked) -> _Val:
        return self._pool(node, vals, tracked, _keep_zero)

    def _dropout(self, node, vals, tracked) -> _Val:
        return _extend(self._src(node, vals, tracked), _dropout_step)

    def _layernorm(self, node, vals, tracked) -> _Val:
        raise _Unsupported("LayerNorm/GroupNorm (normalises across channels)", describe(node, self.modules))

    def _scalar(self, node, vals, tracked) -> float | None:
        """The Python number of a binary op on one tracked tensor (None when there is none)."""
        others = [a for a in node.args if a is not tracked[0]]
        if len(tracked) == 1 and len(node.args) == 2 and not node.kwargs and len(others) == 1 \
                and isinstance(others[0], numbers.Real) and not isinstance(others[0], bool):
            return float(others[0])
        return None

    def _add(self, node, vals, tracked) -> _Val:
        k = self._scalar(node, vals, tracked)
        if k is not None:
            sub = node.target in SUB_FUNCTIONS or node.target in ("sub", "sub_")
            first = node.args[0] is tracked[0]
            sign = -1.0 if sub and first else 1.0
            flip = -1.0 if sub and not first else 1.0
            return _extend(vals[tracked[0]], lambda v, t: flip * v + sign * k)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tracked) != 2 or len(tensors) != 2 or node.kwargs:
            raise _Unsupported("sum of channels with a tensor the analysis does not follow", describe(node, self.modules))
        a, b = vals[tracked[0]], vals[tracked[1]]
        if not self._aligned(a, b):
            raise _Unsupported("sum of misaligned channel layouts", describe(node, self.modules))
        self._close(a)
        self._close(b)
        for (sa, _), (sb, _) in zip(a.segs, b.segs):
            self._spaces[sa].joined = self._spaces[sb].joined = True
            self._union(sa, sb)
        return _Val([(sa, ()) for sa, _ in a.segs], a.block, a.cdim)

    def _aligned(self, a: _Val, b: _Val) -> bool:
        return a.block == b.block and a.cdim == b.cdim and len(a.segs) == len(b.segs) and all(
            self._space_size(sa) == self._space_size(sb) for (sa, _), (sb, _) in zip(a.segs, b.segs))

    def _mul(self, node, vals, tracked) -> _Val:
        """``x * k`` (a Python number) or ``x * g`` with ``g`` a per-channel gate of ``x``'s channels:
        ``g`` broadcasts over every dim but the batch and channel dims, or is computed from ``x``
        (squeeze-excitation); the gate's spaces are sliced with ``x``'s, never required dead."""
        k = self._scalar(node, vals, tracked)
        if k is not None:
            return _extend(vals[tracked[0]], lambda v, t: v * k)
        place = describe(node, self.modules)
        if any(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args) and len(tracked) == 1:
            raise _Unsupported("product of channels with a parameter or buffer (e.g. a layer scale)", place)
        if len(tracked) != 2 or len(node.args) != 2 or node.kwargs or tracked[0] is tracked[1]:
            raise _Unsupported("product of channels with a tensor the analysis does not follow", place)
        a, b = tracked
        gate, main = (a, b) if _broadcasts(a, b) else (b, a) if _broadcasts(b, a) else (None, None)
        if gate is None and _shape(a) == _shape(b):
            gate, main = (a, b) if _ancestor(b, a) else (b, a) if _ancestor(a, b) else (None, None)
        if gate is None:
            raise _Unsupported("product of two channel tensors, neither a per-channel gate of the other", place)
        g, m = vals[gate], vals[main]
        if g.block is not None or m.block is not None or g.cdim != m.cdim or len(g.segs) != len(m.segs) or any(
                self._space_size(sg) != self._space_size(sm) for (sg, _), (sm, _) in zip(g.segs, m.segs)):
            raise _Unsupported("per-channel gate with a channel layout other than its input's", place)
        for (sg, _), (sm, _) in zip(g.segs, m.segs):
            self._spaces[sg].gate = True
            self._union(sm, sg)
        return _extend(m, _keep_zero)

    def _div(self, node, vals, tracked) -> _Val:
        k = self._scalar(node, vals, tracked)
        if k is None or node.args[0] is not tracked[0] or k == 0:
            raise _Unsupported("division of channels by a tensor or by 0", describe(node, self.modules))
        return _extend(vals[tracked[0]], lambda v, t: v / k)

    def _cat(self, node, vals, tracked) -> _Val:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        place = describe(node, self.modules)
        if not isinstance(parts, (list, tuple)) or not all(isinstance(vals.get(p), _Val) for p in parts):
            raise _Unsupported("concatenation with a tensor the analysis does not follow", place)
        first = vals[parts[0]]
        ndim = len(_shape(node) or ())
        if not isinstance(dim, int) or dim % max(ndim, 1) != first.cdim:
            raise _Unsupported("concatenation along a dim that is not the channel dim", place)
        if any(vals[p].block is not None or vals[p].cdim != first.cdim for p in parts):
            raise _Unsupported("concatenation of flattened or differently laid out tensors", place)
        segs = []
        for p in parts:
            self._close(vals[p])
            segs.extend((s, ()) for s, _ in vals[p].segs)
        return _Val(segs, cdim=first.cdim)

    def _reduce(self, node, vals, tracked) -> _Val:
        """``x.mean((2, 3))`` and friends over dims other than the batch and channel dims."""
        src = self._src(node, vals, tracked)
        in_shape = _shape(node.args[0])
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else dims
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if src.block is not None or in_shape is None or not isinstance(dims, (tuple, list)) or any(
            not isinstance(d, int) or d % len(in_shape) in (0, src.cdim) for d in dims
        ) or set(node.kwargs) - {"dim", "keepdim"} or not isinstance(keepdim, bool):
            raise _Unsupported(f"{_name(node, self.modules)} over the batch or channel dim", describe(node, self.modules))
        cdim = src.cdim if keepdim else src.cdim - sum(d % len(in_shape) < src.cdim for d in dims)
        name = getattr(node.target, "__name__", node.target)
        return _Val(_extend(src, _keep_zero if name == "sum" else _keep_const).segs, None, cdim)

    def _flatten(self, node, vals, tracked) -> _Val:
        src = self._src(node, vals, tracked)
        in_shape, shape, place = _shape(node.args[0]), _shape(node), describe(node, self.modules)
        if in_shape is None or shape is None:
            raise _Unsupported("reshape of unknown shape", place)
        if src.block is not None and tuple(in_shape) == tuple(shape):
            return src
        if node.op == "call_module":
            mod = self.modules[node.target]
            if mod.start_dim != 1 or mod.end_dim not in (-1, len(in_shape) - 1):
                raise _Unsupported("flatten not from dim 1 to the end", place)
        if src.block is not None or src.cdim != 1 or len(shape) != 2 or shape[0] != in_shape[0] \
                or shape[1] != math.prod(in_shape[1:]):
            raise _Unsupported("reshape that is not a flatten of [N, C, ...] to [N, C*...] (e.g. a channel shuffle)", place)
        self._close(src)
        return _Val([(s, ()) for s, _ in src.segs], block=math.prod(in_shape[2:]))

    def _permute(self, node, vals, tracked) -> _Val:
        src = vals[tracked[0]]
        dims = node.kwargs.get("dims", node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else None)
        dims = list(dims) if isinstance(dims, (list, tuple)) else None
        if len(tracked) != 1 or node.args[0] is not tracked[0] or src.block is not None or dims is None \
                or not all(isinstance(d, int) for d in dims):
            raise _Unsupported("permute of flattened channels or by computed dims", describe(node, self.modules))
        ndim = len(dims)
        new = [d % ndim for d in dims].index(src.cdim)
        if new == 0:
            raise _Unsupported("permute moving the channel dim to the batch dim", describe(node, self.modules))
        return _Val(list(src.segs), None, new)

    def _shape_query(self, node, vals, tracked) -> None:
        return None  # shape queries do not read channel values

    # -- results ------------------------------------------------------------------------------
    def _collect(self) -> list[ChannelGroup]:
        roots: dict[int, ChannelGroup] = {}
        self.space_group: dict[int, int] = {}
        for sp in self._spaces:
            if sp.gate and (sp.joined or sp.group.consumers or sp.group.checks):
                sp.group.frozen.append("a per-channel gate also used elsewhere")
                self._note("a per-channel gate also used elsewhere", ", ".join(sp.group.producers) or None)
        for s, sp in enumerate(self._spaces):
            g = roots.setdefault(self._find(s), ChannelGroup())
            src = sp.group
            if sp.gate:
                g.gates += [n for n in src.producers + src.channelwise if n not in g.gates]
            else:
                g.producers += src.producers
                g.channelwise += [n for n in src.channelwise if n not in g.channelwise]
            g.checks += src.checks
            g.frozen += src.frozen
            for c in src.consumers:
                if all(c is not d for d in g.consumers):
                    g.consumers.append(c)
        order = {r: i for i, r in enumerate(roots)}
        self._first_space = list(roots)
        for s in range(len(self._spaces)):
            self.space_group[s] = order[self._find(s)]
        groups = list(roots.values())
        for g in groups:
            if not g.producers:
                g.frozen.append("no producer")
        return groups

    def group_size(self, index: int) -> int:
        """Current number of channels of group ``index``."""
        return self._space_size(self._first_space[index])

    def positions(self, name: str, index: int) -> torch.Tensor:
        """Where group ``index``'s channels sit along the channels of channel-wise module ``name``
        now: ``LongTensor [repeats, group_size]`` (one row per time the group enters it, usually 1)."""
        rows, offset = [], 0
        for s in self._segments[name]:
            n = self._space_size(s)
            if self.space_group[s] == index:
                rows.append(torch.arange(offset, offset + n))
            offset += n
        return torch.stack(rows)

    def consumer_columns(self, index: int) -> list[tuple[str, torch.Tensor]]:
        """Where group ``index``'s channels sit along its consumers' input features now: one
        ``(consumer name, LongTensor [group_size, block])`` per time the group enters a consumer (row ``j``:
        the input features channel ``j`` becomes; ``block`` is 1 for a conv, ``H*W`` after ``Flatten``)."""
        out = []
        for c in self.groups[index].consumers:
            offset = 0
            for s in c.segments:
                n = self._space_size(s)
                if self.space_group[s] == index:
                    out.append((c.name, torch.arange(offset, offset + n * c.block).reshape(n, c.block)))
                offset += n * c.block
        return out

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

    def _whole_conv_groups(self, index: int, mask: torch.Tensor) -> torch.Tensor:
        """Keep a channel unless its whole conv group goes, in every grouped conv of the group."""
        sizes = {int(self.modules[n].weight.shape[1]) for n in self.groups[index].channelwise + self.groups[index].gates
                 if isinstance(self.modules[n], _CONVS) and self.modules[n].groups > 1}
        sizes.discard(1)
        changed = bool(sizes)
        while changed:
            before = mask.clone()
            for k in sizes:
                mask = mask.reshape(-1, k).all(1).repeat_interleave(k)
            changed = not torch.equal(mask, before)
        return mask

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
            nothing to remove are absent). At least one channel (one whole conv group, for grouped
            convs) of every group is kept.
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
            mask = self._whole_conv_groups(i, mask)
            if mask.all():
                mask[0] = False
                mask = self._whole_conv_groups(i, mask)
            if mask.any():
                plan[i] = mask.nonzero().flatten()
        return plan


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _name(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return str(getattr(node.target, "__name__", node.target))


def _broadcasts(gate: fx.Node, main: fx.Node) -> bool:
    """``gate`` is ``[N, C, 1, ...]`` against ``main``'s ``[N, C, H, ...]`` (some ``H > 1``)."""
    g, m = _shape(gate), _shape(main)
    if g is None or m is None or len(g) != len(m) or len(g) < 3 or g[:2] != m[:2]:
        return False
    return all(d == 1 for d in g[2:]) and any(d > 1 for d in m[2:])


def _ancestor(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` is computed before and feeds ``b``."""
    seen, todo = set(), list(b.all_input_nodes)
    while todo:
        n = todo.pop()
        if n is a:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def output_size(mod: nn.Module) -> int:
    """Output channels of a conv (``out_channels``) or linear layer (``out_features``)."""
    return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels


def _extend(src: _Val, step: Step) -> _Val:
    return _Val([(s, (*chain, step)) for s, chain in src.segs], src.block, src.cdim)


def _extend_each(src: _Val, make: Callable[[int], Step]) -> _Val:
    """Like :func:`_extend` with the step of segment ``k`` built by ``make(k)``."""
    return _Val([(s, (*chain, make(k))) for k, (s, chain) in enumerate(src.segs)], src.block, src.cdim)


def _keep_const(v: torch.Tensor, train: bool) -> torch.Tensor:
    return v


def _keep_zero(v: torch.Tensor, train: bool) -> torch.Tensor:
    """Zero stays zero; any other constant stops being constant (padding, dropout, a gate)."""
    return torch.where(v == 0, v, torch.full_like(v, float("nan")))


def _dropout_step(v: torch.Tensor, train: bool) -> torch.Tensor:
    return _keep_zero(v, train) if train else v


def _bias_step(mod: nn.Module) -> Step:
    def step(v: torch.Tensor, train: bool) -> torch.Tensor:
        return v + mod.bias.detach().float().cpu() if mod.bias is not None else v

    return step


def _segment(graph: ChannelGraph, name: str, k: int) -> torch.Tensor:
    """Positions of the ``k``-th segment along the channels of channel-wise module ``name``, now."""
    sizes = [graph._space_size(s) for s in graph._segments[name]]
    start = sum(sizes[:k])
    return torch.arange(start, start + sizes[k])


def _grouped_step(graph: ChannelGraph, name: str, k: int) -> Step:
    """Depthwise / grouped conv (``in == out``) of a constant: an output is its bias exactly when
    its whole conv group reads 0 (or its weights are 0); other constants vary at padded borders."""
    mod = graph.modules[name]

    def step(v: torch.Tensor, train: bool) -> torch.Tensor:
        pos = _segment(graph, name, k)
        per_group = int(mod.weight.shape[1])
        bias = mod.bias.detach().float().cpu()[pos] if mod.bias is not None else torch.zeros_like(v)
        w_zero = (mod.weight.detach().flatten(1) == 0).all(1).cpu()[pos]
        zero_in = (v == 0).reshape(-1, per_group).all(1).repeat_interleave(per_group)
        return torch.where(zero_in | w_zero, bias, torch.full_like(v, float("nan")))

    return step


def _bn_step(graph: ChannelGraph, name: str, k: int) -> Step:
    """BatchNorm of a per-channel constant (on the ``k``-th segment of its input): in training mode
    the batch statistics normalise a constant 0 to exactly the shift ``beta`` (other constants only
    approximately, so they are treated as unknown); in eval mode ``(v - mean) / sqrt(var + eps) *
    gamma + beta``."""
    mod = graph.modules[name]

    def step(v: torch.Tensor, train: bool) -> torch.Tensor:
        pos = _segment(graph, name, k)
        w = mod.weight.detach().float().cpu()[pos] if mod.affine else torch.ones_like(v)
        b = mod.bias.detach().float().cpu()[pos] if mod.affine else torch.zeros_like(v)
        if train or mod.running_mean is None:
            return torch.where(v == 0, b, torch.full_like(v, float("nan")))
        rm, rv = mod.running_mean.detach().float().cpu()[pos], mod.running_var.detach().float().cpu()[pos]
        return (v - rm) / torch.sqrt(rv + mod.eps) * w + b

    return step


_HANDLERS: dict[str, Callable] = {
    "conv": ChannelGraph._conv,
    "linear": ChannelGraph._linear,
    "batchnorm": ChannelGraph._batchnorm,
    "elementwise": ChannelGraph._elementwise,
    "const_pool": ChannelGraph._const_pool,
    "zero_pool": ChannelGraph._zero_pool,
    "dropout": ChannelGraph._dropout,
    "layernorm": ChannelGraph._layernorm,
    "add": ChannelGraph._add,
    "mul": ChannelGraph._mul,
    "div": ChannelGraph._div,
    "cat": ChannelGraph._cat,
    "reduce": ChannelGraph._reduce,
    "flatten": ChannelGraph._flatten,
    "permute": ChannelGraph._permute,
    "shape": ChannelGraph._shape_query,
}


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
