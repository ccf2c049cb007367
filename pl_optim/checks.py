"""Argument checks shared by pl_optim, its callbacks, plugins and the examples.

One function per condition, one message per condition. Each returns the value in its canonical
form (``float``, ``int``, ``bool``, ``list``) or raises ``ValueError`` (``TypeError`` for a value
of the wrong kind where noted) whose message names the argument in backticks and echoes the bad
value with ``!r``. ``bool`` is refused wherever a number is expected, even though it is an
``int``.

Example::

    from pl_optim import checks
    self.pct_start = checks.fraction("pct_start", pct_start)          # (0, 1)
    self.rounds = checks.integer("rounds", rounds, minimum=1)
    self.mode = checks.one_of("mode", mode, ("lr", "constant"))
    self.log = checks.boolean("log", log)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _or_none(allow_none: bool) -> str:
    return " or None" if allow_none else ""


def finite(name: str, value: object, allow_none: bool = False) -> float | None:
    """A finite real number."""
    if allow_none and value is None:
        return None
    if not _is_real(value):
        raise ValueError(f"`{name}` must be a finite number{_or_none(allow_none)}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def non_negative(name: str, value: object, allow_none: bool = False) -> float | None:
    """A finite real number >= 0."""
    if allow_none and value is None:
        return None
    if not _is_real(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be a finite number >= 0{_or_none(allow_none)}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def positive(name: str, value: object, allow_none: bool = False) -> float | None:
    """A finite real number > 0 (or ``None`` when ``allow_none``)."""
    if allow_none and value is None:
        return None
    if not _is_real(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be a positive finite number{_or_none(allow_none)}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def in_range(
    name: str,
    value: object,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A finite real number in the interval ``[low, high]`` (``(`` / ``)`` where open)."""
    if allow_none and value is None:
        return None
    ok = _is_real(value) and (low < value if low_open else low <= value) and (  # type: ignore[operator]
        value < high if high_open else value <= high  # type: ignore[operator]
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be in {interval}{_or_none(allow_none)}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def fraction(name: str, value: object, allow_none: bool = False) -> float | None:
    """A number in the open interval (0, 1)."""
    return in_range(name, value, 0.0, 1.0, low_open=True, high_open=True, allow_none=allow_none)


def integer(name: str, value: object, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An ``int`` (not ``bool``, not ``float``), ``>= minimum`` when given."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"`{name}` must be an integer{bound}{_or_none(allow_none)}, got {value!r}")
    return int(value)


def boolean(name: str, value: object) -> bool:
    """``True`` or ``False`` exactly (``"no"``, ``0`` and ``None`` are refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def one_of(name: str, value: T, choices: Sequence[Any]) -> T:
    """One of ``choices`` (compared with ``==``; unhashable values are refused too)."""
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok or isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        raise ValueError(f"`{name}` must be one of {tuple(choices)!r}, got {value!r}")
    return value


def indices(name: str, value: object, allow_none: bool = True) -> list[int] | None:
    """An index >= 0 or a non-empty list/tuple of distinct ones (``None``: all, when allowed)."""
    if value is None and allow_none:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(items, (list, tuple))
        or not items
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items)
        or len(set(items)) != len(items)
    ):
        raise ValueError(
            f"`{name}` must be {'None, ' if allow_none else ''}an index >= 0 or a list of distinct ones, got {value!r}"
        )
    return list(items)


def per_item(name: str, value: object, n: int, what: str = "param groups") -> list[Any]:
    """``value`` repeated ``n`` times, or ``value`` itself when it is a list/tuple of length ``n``.

    The message names both lengths: ``"`max_lr` has 3 values but the optimizer has 1 param groups"``.
    """
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"`{name}` has {len(value)} values but there are {n} {what}, got {list(value)!r}")
        return list(value)
    return [value] * n


def optimizer_in_range(name: str, index: int, n: int) -> int:
    """An optimizer index that exists among ``n`` optimizers (checked at setup)."""
    if index >= n:
        raise ValueError(f"`{name}` is {index!r} but the model configures {n} optimizer(s)")
    return index


def patterns(name: str, value: object, also: str = "") -> list[str]:
    """``None`` (no pattern), one regular expression or a list/tuple of them, each checked to compile.

    The one check behind every name-pattern argument (``DecoupledWeightDecay(exclude=...)``,
    ``LotteryTicket(layers=..., exclude=...)``); callers match with ``re.search``. ``also`` names a
    further accepted kind (handled by the caller) in the message.
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        kinds = f"None, a name pattern, a list of patterns{f' or {also}' if also else ''}"
        raise ValueError(f"`{name}` must be {kinds}, got {value!r}")
    for p in items:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"`{name}` pattern {p!r} is not a valid regular expression ({err}), got {value!r}") from None
    return list(items)
