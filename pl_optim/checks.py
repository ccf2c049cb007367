"""Argument checks shared by pl_optim, its callbacks and the examples.

Each returns the value as a ``float`` or raises ``ValueError`` naming the argument and echoing
the bad value. ``bool`` is refused even though it is an ``int``.
"""

from __future__ import annotations

import math


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def finite(name: str, value: object) -> float:
    """A finite real number."""
    if not _is_real(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def non_negative(name: str, value: object) -> float:
    """A finite real number >= 0."""
    if not _is_real(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def positive(name: str, value: object, allow_none: bool = False) -> float | None:
    """A finite real number > 0 (or ``None`` when ``allow_none``)."""
    if allow_none and value is None:
        return None
    if not _is_real(value) or value <= 0:  # type: ignore[operator]
        suffix = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive finite number{suffix}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
