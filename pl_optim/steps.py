"""The step ledger: the one place that knows which optimizer steps really ran.

Everything in pl_optim that happens "once per optimizer step" (advance a schedule, apply decoupled
weight decay, add the size gradient, count toward a compression decision, re-apply a pruning mask)
subscribes to the :class:`StepLedger` of its optimizer instead of keeping a counter of its own.
Only ``optimizer.step()`` knows whether an update happens, and it can be called in ways a counter
of batches or of hook calls gets wrong:

* gradient-accumulation micro-batches never call ``step()``;
* ``torch.amp.GradScaler.step`` skips ``step()`` when the unscaled gradients hold inf/nan (a
  precision plugin reports it with :meth:`StepLedger.note_skipped`);
* a ``step()`` in which no parameter of the optimizer has a gradient updates nothing (Lightning
  still calls ``step()`` when ``training_step`` returns ``None``): it counts **zero**;
* ``step()`` is re-entrant: a subclass whose ``step`` calls ``super().step()`` runs torch's hook
  wrapper twice once a plain instance of the base class exists (torch wraps both classes'
  ``step``), and a wrapper optimizer may call the ``step`` of another: the ledger counts the
  outermost call **once**;
* manual optimization calls ``step()`` itself: counted the same way.

Rules (one for every subscriber):

* ``before(optimizer)`` fires once per step that will count, once the step's gradients exist
  and before the update: immediately when ``step()`` is called without a closure (plain loops,
  GradScaler, Lightning's mixed precision), or right after the closure's first call with
  ``step(closure)`` (Lightning's automatic optimization computes the gradients inside ``step``;
  LBFGS calls the closure several times).
* ``after(optimizer)`` fires right after the update of a step that counted, with
  :attr:`StepLedger.steps` already incremented.
* Subscribers fire in subscription order (``before`` listeners subscribed with ``early=True``
  first).
* A ``step()`` that raises leaves no trace: the next call is a new outermost step.

The ledger is created by :meth:`StepLedger.of` on first use and lives on the optimizer (torch's
``Optimizer.__getstate__`` keeps only defaults, state and param groups, so a deep copy or an
unpickled optimizer starts without hooks and gets a fresh ledger on first use). It uses torch's own
``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, which every
``torch.optim.Optimizer`` subclass (third-party ones included) runs around ``step``.

Example::

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = StepLedger.of(opt)
    handle = ledger.subscribe(after=lambda o: print("step", ledger.steps, "ran"))
    ...
    handle.remove()
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch

#: a ledger subscriber: ``fn(optimizer)``.
Listener = Callable[[torch.optim.Optimizer], None]
#: ``hook(index, optimizer)`` of :class:`StepHooks`: ``index`` is the position in the sequence given.
StepHook = Callable[[int, torch.optim.Optimizer], None]

_ATTRIBUTE = "_pl_optim_step_ledger"


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


def has_gradient(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any parameter of ``optimizer`` has a gradient (i.e. ``step()`` would update)."""
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


class _Subscription:
    """What :meth:`StepLedger.subscribe` returns: ``.remove()`` unsubscribes (idempotent)."""

    def __init__(self, ledger: StepLedger, before: Listener | None, after: Listener | None) -> None:
        self._ledger, self._before, self._after = ledger, before, after

    def remove(self) -> None:
        if self._ledger is not None:
            for listeners, fn in ((self._ledger._before, self._before), (self._ledger._after, self._after)):
                if fn is not None and fn in listeners:
                    listeners.remove(fn)
            self._ledger = None


class StepLedger:
    """Counts the optimizer steps of one optimizer that really ran, and tells subscribers.

    Get it with :meth:`StepLedger.of` (one ledger per optimizer object); don't construct it.

    Attributes:
        steps: steps that ran (updated something) since the ledger was created or loaded.
        empty: ``step()`` calls that updated nothing (no parameter had a gradient).
        skipped: steps reported skipped with :meth:`note_skipped` (GradScaler inf/nan).
        last_skipped: whether the most recent step attempt was reported skipped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, _token: object = None) -> None:
        if _token is not _CREATE:
            raise TypeError("use StepLedger.of(optimizer) to get an optimizer's ledger")
        self.optimizer = optimizer
        self.steps = 0
        self.empty = 0
        self.skipped = 0
        self.last_skipped = False
        self._before: list[Listener] = []
        self._after: list[Listener] = []
        self._early: list[Listener] = []  # before-listeners subscribed with early=True
        self._outer: FrameType | None = None  # frame of the outermost step() running, if any
        self._counted = False  # whether the running step counts (known once gradients exist)
        # registered for the optimizer's lifetime (the ledger lives on it; nothing ever detaches it)
        optimizer.register_step_pre_hook(self._pre_hook)
        optimizer.register_step_post_hook(self._post_hook)

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> StepLedger:
        """The ledger of ``optimizer``, created (and its hooks registered) on first use.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        """
        (optimizer,) = check_optimizers([optimizer])
        ledger = optimizer.__dict__.get(_ATTRIBUTE)
        if ledger is None or ledger.optimizer is not optimizer:
            ledger = cls(optimizer, _CREATE)
            setattr(optimizer, _ATTRIBUTE, ledger)
        return ledger

    # -- subscribers --------------------------------------------------------------------------
    def subscribe(
        self, before: Listener | None = None, after: Listener | None = None, early: bool = False
    ) -> _Subscription:
        """Call ``before(optimizer)`` / ``after(optimizer)`` around every step that counts (see the
        module docstring for when exactly). Returns a handle with ``.remove()``.

        ``early=True`` runs this ``before`` ahead of every ``before`` not subscribed early (a
        writer of hyper-parameters that others read before the update, e.g. a scheduler placing a
        param group added since the last step); ``after`` always keeps subscription order."""
        if before is None and after is None:
            raise ValueError("`subscribe` needs `before` or `after`")
        if before is not None:
            if early:
                self._before.insert(sum(1 for fn in self._before if fn in self._early), before)
                self._early.append(before)
            else:
                self._before.append(before)
        if after is not None:
            self._after.append(after)
        return _Subscription(self, before, after)

    def note_skipped(self) -> None:
        """Record a step that was attempted but skipped before ``step()`` (e.g. GradScaler found
        inf/nan gradients). It does not count; :attr:`skipped` and :attr:`last_skipped` tell."""
        self.skipped += 1
        self.last_skipped = True

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "empty": self.empty, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])
        self.empty = int(state.get("empty", 0))
        self.skipped = int(state.get("skipped", 0))

    # -- the torch hooks ----------------------------------------------------------------------
    def _is_nested(self) -> bool:
        """Whether the outermost ``step()`` recorded earlier is still running (re-entrant call),
        as opposed to a stale record left by a ``step()`` that raised."""
        frame = sys._getframe(2)
        while frame is not None:
            if frame is self._outer:
                return True
            frame = frame.f_back
        return False

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple | None:
        if self._outer is not None and self._is_nested():
            return None  # re-entrant step(): the outermost call does the bookkeeping
        self._outer = sys._getframe(1)  # torch's hook wrapper of the outermost step()
        self._counted = False
        self.last_skipped = False
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._gradients_ready()
            return None
        called = False

        def closure_then_before() -> Any:
            nonlocal called
            loss = closure()
            if not called:  # LBFGS calls the closure several times: once per step
                called = True
                self._gradients_ready()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_before}
        return (args[0], closure_then_before, *args[2:]), kwargs

    def _gradients_ready(self) -> None:
        self._counted = has_gradient(self.optimizer)
        if self._counted:
            for before in list(self._before):
                before(self.optimizer)

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._outer is not sys._getframe(1):
            return  # the end of a re-entrant step(): the outermost one is still running
        self._outer = None
        if not self._counted:
            self.empty += 1
            return
        self._counted = False
        self.steps += 1
        for after in list(self._after):
            after(self.optimizer)


_CREATE = object()


class StepHooks:
    """Call ``pre(index, optimizer)`` / ``post(index, optimizer)`` around every step that counts
    (the :class:`StepLedger` rules), for several optimizers at once.

    Args:
        optimizers: the optimizers to watch.
        pre: called once the step's gradients exist, before the update.
        post: called after the update (e.g. advance a schedule).
        early: subscribe ahead of the others (see :meth:`StepLedger.subscribe`).

    Raises:
        TypeError: an optimizer is not a ``torch.optim.Optimizer``.

    Example::

        hooks = StepHooks([opt], post=lambda i, o: print("optimizer", i, "stepped"))
        ...
        hooks.remove()
    """

    def __init__(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        pre: StepHook | None = None,
        post: StepHook | None = None,
        early: bool = False,
    ) -> None:
        self.optimizers = check_optimizers(optimizers)
        self.ledgers = [StepLedger.of(o) for o in self.optimizers]
        self._handles: list[_Subscription] = []
        if pre is None and post is None:
            return
        for index, ledger in enumerate(self.ledgers):
            self._handles.append(ledger.subscribe(
                before=None if pre is None else (lambda o, i=index: pre(i, o)),
                after=None if post is None else (lambda o, i=index: post(i, o)),
                early=early,
            ))

    def remove(self) -> None:
        """Unsubscribe every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
