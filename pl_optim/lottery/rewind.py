"""Rewind points: the weights, optimizer state and schedule state of one training step.

Late rewinding (Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery
Ticket Hypothesis", ICML 2020; first as "Stabilizing the LTH") resets the surviving weights not
to their initial values but to those of an early step ``k``, and the rest of the training state
with them: the optimizer's moments and the position of every schedule. :class:`RewindPoint`
captures all of it from a raw PyTorch loop (any object with ``state_dict``/``load_state_dict``
goes in ``extras``: a :class:`~pl_optim.weight_decay.DecoupledDecay`, a torch LR scheduler,
a :class:`~pl_optim.steps.StepLedger`). The Lightning driver uses a real Lightning checkpoint
for the same purpose (loops and callback states included).

Example::

    point = RewindPoint.capture(model, [opt], extras={"sched": scheduler})   # at step k
    ...                                                                     # train, prune
    point.restore(model, [opt], extras={"sched": scheduler})
    MaskSet(weights, masks).apply([opt])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _clone(obj: Any) -> Any:
    """A deep copy with every tensor detached and cloned (state dicts hold live tensors)."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


class RewindPoint:
    """A snapshot of ``model``, ``optimizers`` and ``extras`` (see the module docstring).

    Attributes:
        model: the model's ``state_dict`` (cloned).
        optimizers: each optimizer's ``state_dict`` (cloned).
        extras: name -> ``state_dict`` of the extra objects.
        step: the step the snapshot was taken at (informational).
    """

    def __init__(self, model: dict, optimizers: list[dict], extras: dict[str, Any], step: int = 0) -> None:
        self.model, self.optimizers, self.extras, self.step = model, optimizers, extras, int(step)

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        extras: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> RewindPoint:
        """Snapshot the current state (tensors are cloned: training on does not change it)."""
        return cls(
            _clone(model.state_dict()),
            [_clone(o.state_dict()) for o in optimizers],
            {k: _clone(v.state_dict()) for k, v in (extras or {}).items()},
            step,
        )

    def restore(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        """Put the snapshot back into the same (or identically built) objects, in place.

        Raises:
            ValueError: a different number of optimizers, or an extra the snapshot lacks.
        """
        if len(optimizers) != len(self.optimizers):
            raise ValueError(f"the rewind point holds {len(self.optimizers)} optimizer(s), got {len(optimizers)}")
        missing = sorted(set(extras or {}) - set(self.extras))
        if missing:
            raise ValueError(f"the rewind point has no state for {missing}; it holds {sorted(self.extras)}")
        with torch.no_grad():
            for name, value in model.state_dict().items():  # in place: parameter objects stay
                value.copy_(self.model[name])
        for opt, state in zip(optimizers, self.optimizers):
            opt.load_state_dict(_clone(state))
        for name, obj in (extras or {}).items():
            obj.load_state_dict(_clone(self.extras[name]))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model, "optimizers": self.optimizers, "extras": self.extras, "step": self.step}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RewindPoint:
        return cls(state["model"], list(state["optimizers"]), dict(state["extras"]), state.get("step", 0))


def reinitialize(model: nn.Module, seed: int) -> int:
    """Draw fresh initial values for ``model`` (every module's ``reset_parameters``, BatchNorm
    running statistics included) from ``seed``, without touching the global RNG.

    The "random re-initialisation" control of the lottery ticket paper: same masks, new weights.

    Returns:
        the number of modules reset.
    """
    count = 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                count += 1
            if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
                m.reset_running_stats()
    return count


def clear_optimizer_state(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Forget the per-parameter state (moments, ``step``) of ``optimizers``; hyper-parameters stay."""
    for opt in optimizers:
        opt.state.clear()
