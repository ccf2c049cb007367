"""Dead-channel removal during training, in one object: decide, shrink constants, remove, sync the optimizer.

:class:`ChannelRemoval` is the whole part-II algorithm for a raw PyTorch loop (``docs/channel_removal.md``);
:class:`pl_optim.callbacks.SelfCompression` (``remove_channels=True``) only decides *when* to call
:meth:`ChannelRemoval.step`, broadcasts the decision under DDP and logs it.

One decision (:meth:`ChannelRemoval.step`):

1. **dead** (:meth:`ChannelRemoval.dead`): a channel is dead in a producer when the quantiser's rule says so
   (:func:`~pl_optim.compression.quantizer.dead_channels`, ``bits <= 0``) AND its effective weight row is
   exactly 0;
2. **shrink constants** (:func:`~pl_optim.compression.surgery.shrink_constants`): channels dead in every
   producer of their group get a proximal L1 step of ``shift_decay`` on their bias / BatchNorm shift (their
   optimizer moments zeroed), the paper's L1 term on the outputs of dead channels;
3. **plan** (:meth:`~pl_optim.compression.graph.ChannelGraph.removable`): those whose constant is now 0 at
   every consumer and junction, in train and eval mode (``atol`` for eval-mode running means);
4. **remove** (:class:`~pl_optim.compression.surgery.ChannelRemover`): the layers, the quantisers and every
   optimizer state tensor shaped like a parameter are sliced in place (same ``nn.Parameter`` objects).

Example::

    attach_quantizers(net)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    removal = ChannelRemoval(net, example_input=x0)      # traces the network once
    for x, y in loader:
        ...; opt.step()
        removal.step([opt])                               # -> {"conv2": 3, ...} channels removed
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from pl_optim.checks import non_negative
from pl_optim.compression.graph import ChannelGraph, output_size
from pl_optim.compression.quantizer import dead_channels, quantize, quantized_layers
from pl_optim.compression.surgery import ChannelRemover, Kept, shrink_constants

_SIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
#: ``sync(plan) -> plan``: e.g. a DDP broadcast of rank 0's plan (group index -> list of channel indices).
PlanSync = Callable[[dict[int, list[int]]], dict[int, list[int]]]


def dead_producers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Quantised layer -> bool ``[C_out]``: dead by the quantiser's rule AND a zero weight row.

    Only the rows of channels dead by the rule are quantised (without autograd): quantising every
    weight of a full-size network costs a sizeable part of a step, and this runs every decision."""
    out = {}
    with torch.no_grad():
        for name, (layer, q) in quantized_layers(model).items():
            by_rule = dead_channels(q)
            dead = torch.zeros_like(by_rule)
            idx = by_rule.nonzero().squeeze(1)
            if idx.numel():
                chain = layer.parametrizations.weight
                rows = (quantize(chain.original[idx], q.bits[idx], q.exponent[idx]) if len(chain) == 1
                        else layer.weight[idx])  # another parametrization too: the full weight
                dead[idx] = (rows.flatten(1) == 0).all(1)
            out[name] = dead.cpu()
    return out


def full_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Conv/linear layer -> ``[out, in]`` (``in``: the weight's dim 1), BatchNorm -> ``[features, 0]``, of
    ``model`` as it is now (what :func:`~pl_optim.compression.checkpoint.plain_state_dict` grows back to)."""
    sizes = {n: [output_size(m), int(m.weight.shape[1])] for n, m in model.named_modules() if isinstance(m, _SIZED)}
    sizes.update({n: [int(m.num_features), 0] for n, m in model.named_modules() if isinstance(m, _BN)})
    return sizes


class ChannelRemoval:
    """Remove dead channels of a quantised ``model`` (see the module docstring), remembering what it kept.

    Args:
        model: the network carrying quantisers (:func:`~pl_optim.compression.attach_quantizers`), at full size.
        example_input: one input of ``model`` (a tensor or a tuple of positional arguments) to trace it with;
            None: call :meth:`trace` before the first :meth:`step`.
        shift_decay: L1 proximal step on the constants of dead channels per decision (``>= 0``).
        atol: largest constant a removed channel may leave behind (``>= 0``).

    Attributes:
        kept: layer -> ``{"out": LongTensor, "in": LongTensor}``: indices of the full-size layer still there.
        full: conv/linear layer -> ``[out, in]`` sizes when this object was created (the full-size model).
        events: ``(step, layer, channels removed)`` of every removal.
        unsupported: patterns whose channels are kept (from the trace), without the network output.

    Raises:
        ValueError: a bad argument; ``model`` cannot be traced with ``torch.fx`` (from :meth:`trace`).
    """

    def __init__(self, model: nn.Module, example_input: Any = None, shift_decay: float = 1e-3, atol: float = 1e-6) -> None:
        self.model = model
        self.shift_decay = float(non_negative("shift_decay", shift_decay))
        self.atol = float(non_negative("atol", atol))
        self.kept: Kept = {}
        self.full = full_sizes(model)
        self.events: list[tuple[int, str, int]] = []
        self.graph: ChannelGraph | None = None
        self.remover: ChannelRemover | None = None
        self.unsupported: list[str] = []
        if example_input is not None:
            self.trace(example_input)

    @property
    def traced(self) -> bool:
        """Whether :meth:`trace` ran (a decision needs the dependency graph)."""
        return self.graph is not None

    def trace(self, example_input: Any) -> list[str]:
        """Build the dependency graph from one input; returns the unsupported patterns (channels kept).

        Raises:
            ValueError: the model cannot be traced with ``torch.fx`` (the message says why).
        """
        args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
        self.graph = ChannelGraph(self.model, *args)
        self.remover = ChannelRemover(self.graph, self.kept)
        self.unsupported = [r for r in self.graph.unsupported if r != "network output"]
        return list(self.unsupported)

    def dead(self) -> dict[str, torch.Tensor]:
        """:func:`dead_producers` of the model."""
        return dead_producers(self.model)

    def plan(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[int, torch.Tensor]:
        """Steps 1-3 of a decision: the dead channels, the proximal step on their constants, and the
        channels that can go now (group index -> channel indices)."""
        if self.graph is None:
            raise RuntimeError("ChannelRemoval: call trace(example_input) (or pass `example_input`) before deciding")
        dead = self.dead()
        shrink_constants(self.graph, self.graph.dead_in_all(dead), self.shift_decay, list(optimizers))
        return self.graph.removable(dead, self.atol)

    def apply(self, plan: dict[int, torch.Tensor], optimizers: Iterable[torch.optim.Optimizer] = (),
              step: int = 0) -> dict[str, int]:
        """Step 4: remove the channels of ``plan`` from the model and the optimizers' state; returns
        producer layer -> channels removed (recorded in :attr:`events` with ``step``)."""
        if not plan:
            return {}
        removed = self.remover.remove(plan, list(optimizers))
        self.kept = self.remover.kept
        self.events.extend((int(step), name, n) for name, n in removed.items())
        return removed

    def step(self, optimizers: Iterable[torch.optim.Optimizer] = (), step: int = 0,
             sync: PlanSync | None = None) -> dict[str, int]:
        """One decision: :meth:`plan` then :meth:`apply`.

        Args:
            optimizers: every optimizer holding parameters of the model (their state is sliced along).
            step: the optimizer step number recorded in :attr:`events`.
            sync: called with the plan (lists of ints) before removing; returns the plan to apply (under DDP:
                rank 0's, broadcast, so that every rank removes the same channels).
        """
        optimizers = list(optimizers)
        plan = self.plan(optimizers)
        if sync is not None:
            plan = {int(k): torch.tensor(v, dtype=torch.long) for k, v in sync({k: v.tolist() for k, v in plan.items()}).items()}
        return self.apply(plan, optimizers, step)

    def channel_report(self) -> list[dict[str, Any]]:
        """Per conv/linear layer: output channels of the full-size model and now, and ``dead_kept``: channels
        still there although dead (:func:`dead_producers`) — another producer of a residual sum still writes
        them, only part of their conv group died, their constant (bias / BatchNorm shift) is not yet 0, a
        pattern kept them (:attr:`unsupported`), or they are the last channel of their group."""
        mods = dict(self.model.named_modules())
        dead = self.dead()
        return [{"layer": n, "channels_before": c[0], "channels_after": output_size(mods[n]),
                 "dead_kept": int(dead[n].sum()) if n in dead else 0}
                for n, c in self.full.items() if n in mods and isinstance(mods[n], _SIZED)]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors / numbers: the kept indices, the full sizes and the events."""
        return {
            "kept": {n: {k: v.clone() for k, v in e.items()} for n, e in self.kept.items()},
            "full": {n: list(s) for n, s in self.full.items()},
            "events": [list(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model must be brought to the kept shapes separately, e.g. by
        :func:`~pl_optim.compression.checkpoint.restore_compressed`); the graph is traced again."""
        self.kept = {n: dict(e) for n, e in state.get("kept", {}).items()}
        self.full = {n: list(s) for n, s in state.get("full", self.full).items()}
        self.events = [tuple(e) for e in state.get("events", [])]
        self.graph = self.remover = None
