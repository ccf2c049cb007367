"""Hyper-parameter schedules as pure functions of progress, and the param-group writer.

Every schedule is an immutable callable ``schedule(step, total) -> float``: the value to use at
optimizer step ``step`` (0-based: the number of steps that already ran) of a run of ``total``
steps. Nothing is stored between calls, so the caller owns the counter (and can checkpoint it as a
plain number). The conventions follow ``torch.optim.lr_scheduler`` so that each schedule equals its
torch counterpart step by step (``pct = step / total``):

==========================  =============================================  =========================
schedule                    value at ``pct = step / total``                torch counterpart
==========================  =============================================  =========================
``Constant(v)``             ``v``                                          ``ConstantLR(factor=1)``
``Linear(a, b)``            ``(b - a) * pct + a``                          ``LinearLR``
``Cosine(a, b)``            ``b + (a - b) / 2 * (1 + cos(pi * pct))``      ``CosineAnnealingLR``
``Exponential(a, b)``       ``a * (b / a) ** pct``                         ``ExponentialLR``
``Polynomial(a, b, p)``     ``(a - b) * (1 - pct) ** p + b``               ``PolynomialLR``
``StepDecay(a, n, g)``      ``a * g ** (step // n)``                       ``StepLR``
``MultiStep(a, ms, g)``     ``a * g ** #{m in ms : m <= step}``            ``MultiStepLR``
``WarmRestarts(a, b, T, m)``cosine ``a -> b`` restarted, periods ``T*m^k``  ``CosineAnnealingWarmRestarts``
``Warmup(s, n, start)``     linear ``start -> s(0)`` for ``n`` steps, then ``s``   ``LinearLR`` + ``SequentialLR``
``Combined(pcts, ss)``      ``ss[i]`` over the fraction ``pcts[i]`` of the run  fastai ``combine_scheds``
``OneCycle`` (see below)    warm-up then anneal, torch's phase boundaries  ``OneCycleLR``
==========================  =============================================  =========================

Lengths given as ``int`` are optimizer steps; lengths given as ``float`` are fractions of
``total`` (in ``(0, 1]``), so a schedule can be written once for any run length.

:func:`one_cycle` returns the ``(lr, momentum)`` schedules of Smith's 1cycle policy with the phase
boundaries of ``torch.optim.lr_scheduler.OneCycleLR`` (phase ends at ``pct_start * total - 1``,
``2 * pct_start * total - 2`` and ``total - 1``), so its values equal torch's to rounding.

Writing the values into an optimizer's ``param_groups`` is :mod:`pl_optim.param_groups`'s job.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from pl_optim import checks
from pl_optim.checks import finite as _finite

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "Cosine",
    "Exponential",
    "Polynomial",
    "StepDecay",
    "MultiStep",
    "WarmRestarts",
    "Warmup",
    "Combined",
    "one_cycle",
    "check_schedule",
]

Length = int | float


def _positive(name: str, value: float) -> float:
    if _finite(name, value) <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    return float(value)


def _length(name: str, value: Length) -> Length:
    """An ``int`` >= 1 (steps) or a ``float`` in (0, 1] (fraction of the run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be an int (steps) or a float in (0, 1] (fraction), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"`{name}` must be >= 1 when given in steps, got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1] when given as a fraction of the run, got {value!r}")
    return value


def _steps(length: Length, total: float) -> float:
    return float(length) if isinstance(length, int) else length * total


class Schedule:
    """Base class: an immutable callable ``schedule(step, total) -> float``.

    Subclasses implement :meth:`__call__`. ``step`` and ``total`` may be floats (sub-schedules of
    :class:`Combined` and :func:`one_cycle` are evaluated on phase-relative positions).
    """

    def __call__(self, step: float, total: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _public(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._public().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._public() == other._public()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


class Constant(Schedule):
    """``value`` at every step."""

    def __init__(self, value: float) -> None:
        self.value = _finite("value", value)

    def __call__(self, step: float, total: float) -> float:
        return self.value


class _Anneal(Schedule):
    """``start`` at step 0, ``end`` at step ``total`` (torch's convention), shape from :meth:`at`."""

    def __init__(self, start: float, end: float) -> None:
        self.start = _finite("start", start)
        self.end = _finite("end", end)

    def __call__(self, step: float, total: float) -> float:
        return self.at(step / total if total > 0 else 1.0)

    def at(self, pct: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class Linear(_Anneal):
    """Linear interpolation: ``(end - start) * pct + start``."""

    def at(self, pct: float) -> float:
        return (self.end - self.start) * pct + self.start


class Cosine(_Anneal):
    """Half-cosine: ``end + (start - end) / 2 * (1 + cos(pi * pct))`` (SGDR without restarts)."""

    def at(self, pct: float) -> float:
        return self.end + (self.start - self.end) / 2.0 * (math.cos(math.pi * pct) + 1)


class Exponential(_Anneal):
    """Geometric interpolation: ``start * (end / start) ** pct`` (``start``, ``end`` > 0); torch's
    ``ExponentialLR(gamma)`` is ``Exponential(lr, lr * gamma ** total)``."""

    def __init__(self, start: float, end: float) -> None:
        super().__init__(_positive("start", start), _positive("end", end))

    def at(self, pct: float) -> float:
        return self.start * (self.end / self.start) ** pct


class Polynomial(_Anneal):
    """``(start - end) * (1 - pct) ** power + end``; ``power=1`` is linear (torch ``PolynomialLR``)."""

    def __init__(self, start: float, end: float = 0.0, power: float = 1.0) -> None:
        super().__init__(start, end)
        self.power = _positive("power", power)

    def at(self, pct: float) -> float:
        return (self.start - self.end) * max(0.0, 1.0 - pct) ** self.power + self.end


class StepDecay(Schedule):
    """``start * gamma ** floor(step / step_size)`` (torch ``StepLR``); ``step_size`` in steps or as a
    fraction of the run."""

    def __init__(self, start: float, step_size: Length, gamma: float = 0.1) -> None:
        self.start = _finite("start", start)
        self.step_size = _length("step_size", step_size)
        self.gamma = _positive("gamma", gamma)

    def __call__(self, step: float, total: float) -> float:
        return self.start * self.gamma ** math.floor(step / max(_steps(self.step_size, total), 1e-300))


class MultiStep(Schedule):
    """``start * gamma ** (number of milestones <= step)`` (torch ``MultiStepLR``); milestones in
    steps (ints) or fractions of the run (floats), increasing."""

    def __init__(self, start: float, milestones: Sequence[Length], gamma: float = 0.1) -> None:
        self.start = _finite("start", start)
        self.milestones = tuple(_length("milestones", m) for m in milestones)
        if not self.milestones or any(type(m) is not type(self.milestones[0]) for m in self.milestones):
            raise ValueError(f"`milestones` must be a non-empty list of ints or of floats, got {list(milestones)!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"`milestones` must be increasing, got {list(milestones)!r}")
        self.gamma = _positive("gamma", gamma)

    def __call__(self, step: float, total: float) -> float:
        marks = [_steps(m, total) for m in self.milestones]
        return self.start * self.gamma ** bisect.bisect_right(marks, step)


class WarmRestarts(Schedule):
    """SGDR (Loshchilov & Hutter): cosine from ``start`` to ``end`` over ``period`` steps, restarted
    with each period ``mult`` times longer (torch ``CosineAnnealingWarmRestarts(T_0, T_mult)``)."""

    def __init__(self, start: float, end: float = 0.0, period: Length = 0.25, mult: int = 1) -> None:
        self.start, self.end = _finite("start", start), _finite("end", end)
        self.period = _length("period", period)
        if isinstance(mult, bool) or not isinstance(mult, int) or mult < 1:
            raise ValueError(f"`mult` must be an integer >= 1, got {mult!r}")
        self.mult = mult

    def __call__(self, step: float, total: float) -> float:
        t0 = _steps(self.period, total)
        if self.mult == 1:
            t_cur, t_i = step % t0, t0
        else:
            n = int(math.log(step / t0 * (self.mult - 1) + 1, self.mult))
            t_cur = step - t0 * (self.mult**n - 1) / (self.mult - 1)
            t_i = t0 * self.mult**n
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


def check_schedule(name: str, s: object) -> Schedule:
    if not callable(s):
        raise ValueError(f"`{name}` must be a schedule (callable (step, total) -> float), got {s!r}")
    return s  # type: ignore[return-value]


class Warmup(Schedule):
    """Linear warm-up from ``start`` to ``schedule``'s first value over ``steps``, then ``schedule``
    over the remaining ``total - steps`` steps."""

    def __init__(self, schedule: Schedule, steps: Length, start: float = 0.0) -> None:
        self.schedule = check_schedule("schedule", schedule)
        self.steps = _length("steps", steps)
        self.start = _finite("start", start)

    def __call__(self, step: float, total: float) -> float:
        n = _steps(self.steps, total)
        rest = max(total - n, 0.0)
        if step < n:
            return Linear(self.start, self.schedule(0, rest))(step, n)
        return self.schedule(step - n, rest)


def _piecewise(step: float, bounds: Sequence[float], schedules: Sequence[Schedule], inclusive: bool) -> float:
    """Evaluate the phase holding ``step``: phase i spans ``(bounds[i-1], bounds[i]]`` when
    ``inclusive`` (torch OneCycleLR) else ``[bounds[i-1], bounds[i])`` (fastai), ``bounds[-1] = 0``;
    the last phase extends to infinity. The phase schedule sees ``(step - start, end - start)``."""
    start = 0.0
    last = len(schedules) - 1
    for i, (end, sched) in enumerate(zip(bounds, schedules)):
        if i == last or (step <= end if inclusive else step < end):
            return sched(step - start, end - start)
        start = end
    raise AssertionError("unreachable")


class Combined(Schedule):
    """Phases one after the other (fastai's ``combine_scheds``): ``schedules[i]`` runs over the
    fraction ``pcts[i]`` of the run, seeing phase-relative ``(step, total)``.

    Example::

        warm_cos = Combined([0.25, 0.75], [Cosine(1e-4, 1e-2), Cosine(1e-2, 1e-6)])
    """

    def __init__(self, pcts: Sequence[float], schedules: Sequence[Schedule]) -> None:
        self.pcts = tuple(_finite("pcts", p) for p in pcts)
        self.schedules = tuple(check_schedule("schedules", s) for s in schedules)
        if len(self.pcts) != len(self.schedules) or not self.pcts:
            raise ValueError(f"`pcts` and `schedules` must have the same non-zero length, got {len(self.pcts)} and {len(self.schedules)}")
        if any(p <= 0 for p in self.pcts) or abs(sum(self.pcts) - 1.0) > 1e-9:
            raise ValueError(f"`pcts` must be positive and sum to 1, got {list(pcts)!r}")

    def __call__(self, step: float, total: float) -> float:
        bounds, acc = [], 0.0
        for p in self.pcts:
            acc += p
            bounds.append(acc * total)
        return _piecewise(step, bounds, self.schedules, inclusive=False)


class _OneCyclePhases(Schedule):
    """torch ``OneCycleLR``'s phases: ends at ``pct*T - 1`` (``2*pct*T - 2``) and ``T - 1``."""

    def __init__(self, pct_start: float, schedules: Sequence[Schedule]) -> None:
        self.pct_start = pct_start
        self.schedules = tuple(schedules)
        self._ends: tuple[float, list[float]] = (math.nan, [])  # cache: (total, phase ends)

    def __call__(self, step: float, total: float) -> float:
        cached_total, ends = self._ends
        if cached_total != total:  # computed once per run length, not once per step
            ends = [float(self.pct_start * total) - 1]
            if len(self.schedules) == 3:
                ends.append(float(2 * self.pct_start * total) - 2)
            ends.append(total - 1)
            self._ends = (total, ends)
        return _piecewise(step, ends, self.schedules, inclusive=True)


ANNEAL = {"cos": Cosine, "linear": Linear}


def one_cycle(
    max_lr: float,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> tuple[Schedule, Schedule]:
    r"""The ``(lr, momentum)`` schedules of the 1cycle policy (Smith 2018; torch ``OneCycleLR``).

    With :math:`\eta_0 = \eta_{max}/d`, :math:`\eta_{min} = \eta_0/f` and anneal :math:`A`
    (cosine or linear), the lr goes :math:`\eta_0 \to \eta_{max}` over the first ``pct_start``
    of the run, then :math:`\eta_{max} \to \eta_{min}` (``three_phase``: :math:`\eta_{max} \to
    \eta_0` symmetrically, then :math:`\eta_0 \to \eta_{min}`); momentum moves the opposite way,
    ``max_momentum -> base_momentum -> max_momentum``. Phase boundaries are torch's.

    Args:
        max_lr: peak learning rate.
        pct_start: fraction of the run spent warming up.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        base_momentum: lowest momentum (at the lr peak).
        max_momentum: highest momentum (at both ends).
        div_factor: ``initial_lr = max_lr / div_factor``.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``.
        three_phase: use the symmetric three-phase variant.

    Returns:
        ``(lr_schedule, momentum_schedule)``.

    Raises:
        ValueError: a bad argument (named, with its value).

    Example::

        lr, mom = one_cycle(0.1)
        [lr(s, 100) for s in range(100)]  # == torch OneCycleLR(opt, 0.1, total_steps=100)'s lrs
    """
    _positive("max_lr", max_lr)
    checks.fraction("pct_start", pct_start)
    checks.one_of("anneal_strategy", anneal_strategy, sorted(ANNEAL))
    for name, m in (("base_momentum", base_momentum), ("max_momentum", max_momentum)):
        checks.in_range(name, m, 0.0, 1.0, high_open=True)
    _positive("div_factor", div_factor)
    _positive("final_div_factor", final_div_factor)
    checks.boolean("three_phase", three_phase)
    anneal = ANNEAL[anneal_strategy]
    initial = max_lr / div_factor
    minimum = initial / final_div_factor
    if three_phase:
        lr = [anneal(initial, max_lr), anneal(max_lr, initial), anneal(initial, minimum)]
        mom = [anneal(max_momentum, base_momentum), anneal(base_momentum, max_momentum), anneal(max_momentum, max_momentum)]
    else:
        lr = [anneal(initial, max_lr), anneal(max_lr, minimum)]
        mom = [anneal(max_momentum, base_momentum), anneal(base_momentum, max_momentum)]
    return _OneCyclePhases(pct_start, lr), _OneCyclePhases(pct_start, mom)
