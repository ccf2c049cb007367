"""Reading and writing hyper-parameters in an optimizer's ``param_groups``.

The keys the ecosystem reads (``LearningRateMonitor``, torch schedulers): ``group["lr"]``,
``group["momentum"]`` or ``group["betas"]``, ``group["weight_decay"]``, or any custom key.
:func:`resolve_field` maps a user's field name to such a key, :func:`read_field` /
:func:`write_field` access it (``betas[0]`` style keys; tensor values written in place), and
:class:`GroupWriter` writes the values of :mod:`pl_optim.schedules` schedules into every group.

**Groups added after the writer was built** (``optimizer.add_param_group`` during training, e.g. a
fine-tuning unfreeze): :meth:`GroupWriter.adopt_new_groups` (called before every write) schedules
them with the field's schedule when ONE schedule was given for all groups, with multiplier 1 (or,
for ``"initial"`` multipliers, the group's own value when it is adopted). When the field has one
schedule per group, or explicit per-group multipliers, a new group cannot be placed: a
``ValueError`` names the group and says what to pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from pl_optim.checks import finite
from pl_optim.schedules import Schedule, check_schedule

__all__ = ["GroupWriter", "read_field", "resolve_field", "write_field"]

_ALIASES = {"beta1": "betas[0]", "beta2": "betas[1]"}


def resolve_field(optimizer: torch.optim.Optimizer, field: str) -> str:
    """Map a user field name to the param-group key it drives, checking the optimizer has it.

    ``"momentum"`` means ``group["momentum"]`` (SGD, RMSprop) or, for optimizers with ``betas``
    (the Adam family), ``betas[0]``. ``"beta1"``/``"beta2"`` are aliases of ``"betas[0]"``/
    ``"betas[1]"``. Any other key must already exist in every param group.

    Raises:
        ValueError: the optimizer's param groups lack the field.
    """
    key = _ALIASES.get(field, field)
    group = optimizer.param_groups[0]
    if key == "momentum" and "momentum" not in group and "betas" in group:
        key = "betas[0]"
    base = "betas" if key.startswith("betas[") else key
    if key.startswith("betas[") and key not in ("betas[0]", "betas[1]"):
        raise ValueError(f"field {field!r} is not supported; use 'betas[0]' or 'betas[1]'")
    if any(base not in g for g in optimizer.param_groups):
        have = sorted(k for k, v in group.items() if k != "params" and isinstance(v, (int, float, tuple)))
        raise ValueError(
            f"{type(optimizer).__name__} has no param-group field {field!r} (it has {have}); "
            "'momentum' needs SGD/RMSprop-style `momentum` or Adam-style `betas`"
        )
    return key


def _setter(key: str) -> Callable[[dict, float], None]:
    if key == "betas[0]":
        def set_beta1(group: dict, value: float) -> None:
            group["betas"] = (value, *group["betas"][1:])
        return set_beta1
    if key == "betas[1]":
        def set_beta2(group: dict, value: float) -> None:
            group["betas"] = (group["betas"][0], value, *group["betas"][2:])
        return set_beta2

    def set_key(group: dict, value: float) -> None:
        current = group[key]
        if isinstance(current, torch.Tensor):  # tensor lr (e.g. for a compiled step): in place, like torch
            current.fill_(value)
        else:
            group[key] = value
    return set_key


def write_field(group: dict, key: str, value: float) -> None:
    """Write a resolved field (``"betas[0]"`` style keys included; tensor values in place)."""
    _setter(key)(group, value)


def read_field(group: dict, key: str) -> float:
    """The current value of a resolved field (``"betas[0]"`` style keys included)."""
    if key.startswith("betas["):
        return float(group["betas"][int(key[6])])
    return group[key]


class GroupWriter:
    """Write scheduled values into the param groups of one optimizer.

    For param group :math:`g` and field :math:`k`:
    :math:`\\text{group}_g[k] \\leftarrow m_{k,g} \\cdot s_{k,g}(\\text{step}, \\text{total})`,
    where :math:`s_{k,g}` is one schedule for all groups or one per group, and :math:`m_{k,g}` the
    per-group multiplier (discriminative learning rates; default 1).

    Args:
        optimizer: the optimizer whose ``param_groups`` are written.
        schedules: field -> a schedule, or a list with one schedule per param group. Fields:
            ``"lr"``, ``"momentum"`` (``betas[0]`` on Adam-likes), ``"betas[0]"``/``"beta1"``,
            ``"betas[1]"``/``"beta2"``, ``"weight_decay"``, or any existing custom key.
        multipliers: field -> one factor per param group, or ``"initial"``: each group's current
            value of the field (schedules then act as factors of what ``configure_optimizers``
            set, e.g. ``Cosine(1.0, 0.0)`` on discriminative lrs).

    Raises:
        ValueError: a missing field, or a per-group list of the wrong length.

    Example::

        writer = GroupWriter(opt, {"lr": Cosine(0.1, 0.0)}, {"lr": [0.1, 1.0]})
        writer.apply(step, total)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedules: Mapping[str, Schedule | Sequence[Schedule]],
        multipliers: Mapping[str, Sequence[float] | str] | None = None,
    ) -> None:
        self.optimizer = optimizer
        groups = optimizer.param_groups
        n = len(groups)
        multipliers = dict(multipliers or {})
        unknown = set(multipliers) - set(schedules)
        if unknown:
            raise ValueError(f"`multipliers` names fields without a schedule: {sorted(unknown)}")
        # one entry per (group, field): (group dict, setter, schedule, multiplier)
        self.entries: list[tuple[dict, Callable[[dict, float], None], Schedule, float]] = []
        self.keys: dict[str, str] = {}
        self.multipliers: dict[str, list[float]] = {}
        self.n_groups = n
        # how a group added later is scheduled, per field: (the shared schedule or None, "initial"?, explicit list?)
        self._adopt: dict[str, tuple[Schedule | None, bool, bool]] = {}
        for field, sched in schedules.items():
            key = resolve_field(optimizer, field)
            self.keys[field] = key
            per_group = list(sched) if isinstance(sched, (list, tuple)) else [sched] * n
            if len(per_group) != n:
                raise ValueError(f"`{field}` has {len(per_group)} schedules but the optimizer has {n} param groups")
            given = multipliers.get(field, [1.0] * n)
            # "initial": each group's current value (e.g. discriminative lrs from configure_optimizers)
            mults = [read_field(g, key) for g in groups] if given == "initial" else list(given)
            if len(mults) != n:
                raise ValueError(f"`multipliers[{field!r}]` has {len(mults)} values but the optimizer has {n} param groups, got {mults!r}")
            for m in mults:
                finite(f"multipliers[{field!r}]", m)
            self.multipliers[field] = [float(m) for m in mults]
            setter = _setter(key)
            for group, s, m in zip(groups, per_group, mults):
                self.entries.append((group, setter, check_schedule(field, s), float(m)))
            shared = None if isinstance(sched, (list, tuple)) else sched
            self._adopt[field] = (shared, given == "initial", field in multipliers and given != "initial")

    def adopt_new_groups(self) -> list[int]:
        """Schedule the groups added to the optimizer since the last call (module docstring rule);
        returns their indices.

        Raises:
            ValueError: a field has one schedule (or one explicit multiplier) per group, so a new
                group has none; the message names the group and what to pass.
        """
        groups = self.optimizer.param_groups
        new = list(range(self.n_groups, len(groups)))
        if not new:
            return new
        for field, (shared, _, explicit) in self._adopt.items():
            if shared is None or explicit:
                what = "one schedule per param group" if shared is None else "explicit per-group multipliers"
                raise ValueError(
                    f"param group(s) {new} of {type(self.optimizer).__name__} were added after scheduling started, "
                    f"but `{field}` was given {what} ({self.n_groups} of them): pass one schedule for all groups "
                    f"(with multipliers='initial' to keep each group's own scale), or add the groups before "
                    "training starts and give them entries"
                )
        for field, (shared, initial, _) in self._adopt.items():
            key, setter = self.keys[field], _setter(self.keys[field])
            for index in new:
                m = float(read_field(groups[index], key)) if initial else 1.0
                self.multipliers[field].append(m)
                self.entries.append((groups[index], setter, shared, m))
        self.n_groups = len(groups)
        return new

    def values(self, step: float, total: float) -> list[float]:
        """The values :meth:`apply` would write, in entry order (field-major, then group)."""
        return [m * s(step, total) for _, _, s, m in self.entries]

    def apply(self, step: float, total: float, only_new: bool = False) -> None:
        """Write every scheduled field of every param group for position ``step`` of ``total``
        (groups added since the last write are adopted first, see :meth:`adopt_new_groups`).
        ``only_new``: write only the groups adopted by this call (e.g. right before a step, when
        the other groups already hold this step's values)."""
        new = self.adopt_new_groups() if len(self.optimizer.param_groups) != self.n_groups else []
        if only_new:
            targets = [self.optimizer.param_groups[i] for i in new]
            entries = [e for e in self.entries if any(e[0] is g for g in targets)]
        else:
            entries = self.entries
        for group, setter, s, m in entries:
            setter(group, m * s(step, total))
