"""Hooks around the optimizer steps that actually run.

Everything in pl_optim that must happen "once per optimizer step" (advance a schedule, apply
decoupled weight decay, count toward a compression decision) hangs off these hooks instead of
batch hooks, because only ``optimizer.step()`` itself knows whether an update happened:

* gradient-accumulation micro-batches never call ``optimizer.step()``;
* ``torch.amp.GradScaler.step`` skips ``optimizer.step()`` when the unscaled gradients hold
  inf/nan, so a skipped fp16 step fires neither hook;
* manual optimization calls ``optimizer.step()`` itself, so the hooks fire there too.

They use torch's own ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, which
every ``torch.optim.Optimizer`` subclass (third-party ones included) runs around ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle

#: ``hook(index, optimizer)``: ``index`` is the optimizer's position in the sequence given.
StepHook = Callable[[int, torch.optim.Optimizer], None]


def check_optimizers(optimizers: Sequence[object]) -> list[torch.optim.Optimizer]:
    """Return ``optimizers`` as a list, raising ``TypeError`` for anything that is not a
    ``torch.optim.Optimizer`` (step hooks only exist there)."""
    out = []
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer {i} is a {type(opt).__name__}; pl_optim supports subclasses of "
                "torch.optim.Optimizer (torch's own and third-party ones)"
            )
        out.append(opt)
    return out


class StepHooks:
    """Call ``pre`` right before and ``post`` right after every ``optimizer.step()`` that runs.

    Args:
        optimizers: the optimizers to watch.
        pre: called as ``pre(index, optimizer)`` when ``step()`` is entered, before the update.
            With ``step(closure)`` (Lightning's automatic optimization) that is also before the
            closure computes this step's gradients; see
            :meth:`pl_optim.weight_decay.DecoupledDecay.torch_pre_hook` for a hook that waits for them.
        post: called as ``post(index, optimizer)`` after the update (e.g. advance a schedule).

    Raises:
        TypeError: an optimizer is not a ``torch.optim.Optimizer``.

    Example::

        hooks = StepHooks([opt], post=lambda i, o: counter.__setitem__(i, counter[i] + 1))
        ...
        hooks.remove()
    """

    def __init__(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        pre: StepHook | None = None,
        post: StepHook | None = None,
    ) -> None:
        self.optimizers = check_optimizers(optimizers)
        self._handles: list[RemovableHandle] = []
        for index, opt in enumerate(self.optimizers):
            if pre is not None:
                self._handles.append(opt.register_step_pre_hook(_adapt(pre, index)))
            if post is not None:
                self._handles.append(opt.register_step_post_hook(_adapt(post, index)))

    def remove(self) -> None:
        """Unregister every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _adapt(hook: StepHook, index: int) -> Callable[[torch.optim.Optimizer, tuple, dict], None]:
    def torch_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        hook(index, optimizer)

    return torch_hook
