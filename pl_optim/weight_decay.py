"""Decoupled weight decay for any ``torch.optim.Optimizer`` (Loshchilov & Hutter, "AdamW").

L2 regularisation adds ``λ·w`` to the gradient; inside an adaptive optimizer that term is divided
by ``sqrt(avg_squared)``, so the weights that move most are barely regularised. Decoupled decay
shrinks the weights directly, right before the optimizer's update (the order of
``torch.optim.AdamW``), with the optimizer's own ``weight_decay`` held at 0. Modes (``lr`` is the
group's current learning rate, ``λ`` the decay):

* ``"lr"``:        ``w ← w·(1 − lr·λ)``            (torch AdamW, fastai)
* ``"lr_ratio"``:  ``w ← w·(1 − (lr/lr_ref)·λ)``   (Composer; ``lr_ref`` is kept here, never
  ``group["initial_lr"]``, which OneCycleLR and LR finders overwrite)
* ``"constant"``:  ``w ← w·(1 − λ)``
* ``"l2"``:        ``g ← g + λ·w``                 (classic coupled L2, for comparisons)

Only parameters that have a gradient are touched (as in torch AdamW). The hot path runs
``torch._foreach_*`` over each (device, dtype) bucket; :func:`apply_weight_decay` with
``foreach=False`` is the plain-loop reference the tests compare against.

:class:`DecoupledDecay` wires this to an optimizer through its :class:`pl_optim.steps.StepLedger`
(usable from a raw PyTorch loop); ``pl_optim.callbacks.DecoupledWeightDecay`` is its Lightning
front end.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

from pl_optim import checks
from pl_optim.checks import non_negative
from pl_optim.precision import original_param
from pl_optim.steps import StepLedger, _Subscription, check_optimizers

Mode = Literal["lr", "lr_ratio", "constant", "l2"]
MODES: tuple[str, ...] = ("lr", "lr_ratio", "constant", "l2")
#: ``predicate(name, param) -> True`` to EXCLUDE the parameter from decay.
ExcludePredicate = Callable[[str, torch.Tensor], bool]
Exclude = str | Sequence[str] | ExcludePredicate | None

# group["weight_decay"] is set to this very object while optimizer.step() runs, so the post-step
# hook can tell "still our zero" (restore λ) from a value another writer (e.g. a ParamScheduler)
# put there in the meantime, even a 0.0 of its own (checked by identity, not value).
_STEP_ZERO = float("0")


def check_weight_decay(value: object, name: str = "weight_decay") -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a finite number >= 0."""
    return non_negative(name, value)


def check_mode(mode: object) -> str:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def decay_coefficient(mode: str, weight_decay: float, lr: float, lr_ref: float | None = None) -> float:
    """The effective decay of one step: the fraction of ``w`` removed (decoupled modes) or the
    L2 coefficient added to the gradient (``"l2"``).

    ``"lr"``: ``lr·λ``; ``"lr_ratio"``: ``(lr/lr_ref)·λ``; ``"constant"`` and ``"l2"``: ``λ``.

    Raises:
        ValueError: unknown mode, ``lr_ref`` missing or not > 0 in ``"lr_ratio"`` mode, or a
            decoupled coefficient outside [0, 1] (``w·(1 − c)`` would flip or blow up the weights).
    """
    check_mode(mode)
    lr = checks.non_negative("lr", lr)
    weight_decay = check_weight_decay(weight_decay)
    if mode == "lr":
        coefficient = lr * weight_decay
    elif mode == "lr_ratio":
        if lr_ref is None or not lr_ref > 0:
            raise ValueError(f"mode 'lr_ratio' needs `lr_ref` > 0, got {lr_ref!r}")
        coefficient = lr / lr_ref * weight_decay
    else:
        coefficient = weight_decay
    if mode != "l2" and not 0.0 <= coefficient <= 1.0:
        raise ValueError(
            f"decoupled decay coefficient must be in [0, 1] (w <- w*(1 - c)), got c = {coefficient!r} "
            f"(mode {mode!r}, weight_decay {weight_decay!r}, lr {lr!r}, lr_ref {lr_ref!r})"
        )
    return coefficient


def apply_weight_decay(
    params: Iterable[torch.Tensor], coefficient: float, mode: str = "lr", foreach: bool = True
) -> None:
    """Apply one step of decay with an already computed :func:`decay_coefficient`.

    Decoupled modes: ``w ← w·(1 − c)``; ``"l2"``: ``w.grad ← w.grad + c·w``. Parameters whose
    ``grad`` is ``None`` are skipped (torch AdamW does the same).

    Args:
        params: the parameters to decay.
        coefficient: ``c`` from :func:`decay_coefficient`.
        mode: one of :data:`MODES`.
        foreach: ``True`` uses ``torch._foreach_*`` per (device, dtype) bucket; ``False`` is the
            plain-loop reference.
    """
    check_mode(mode)
    checks.boolean("foreach", foreach)
    if mode == "l2":
        checks.non_negative("coefficient", coefficient)
    else:
        checks.in_range("coefficient", coefficient, 0.0, 1.0)
    params = [p for p in params if p.grad is not None]
    if not params or coefficient == 0:
        return
    if not foreach:
        with torch.no_grad():
            for p in params:
                if mode == "l2":
                    p.grad.add_(p, alpha=coefficient)
                else:
                    p.mul_(1.0 - coefficient)
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    with torch.no_grad():
        for bucket in buckets.values():
            if mode == "l2":
                torch._foreach_add_([p.grad for p in bucket], bucket, alpha=coefficient)
            else:
                torch._foreach_mul_(bucket, 1.0 - coefficient)


def compile_exclude(exclude: Exclude, exclude_1d: bool = True) -> tuple[ExcludePredicate, list[str]]:
    """Build the predicate ``(name, param) -> True if excluded from decay``.

    Args:
        exclude: ``None``; a regular expression or a sequence of them, matched with
            ``re.search`` against the parameter's qualified name (``"bias"``, ``r"\\.bn\\d*\\."``);
            or a predicate ``(name, param) -> bool``.
        exclude_1d: also exclude every parameter with ``ndim <= 1`` (biases, norm scales/shifts).

    Returns:
        the predicate and the list of patterns (to check with :func:`unmatched_patterns`).

    Raises:
        ValueError: ``exclude`` has another type, or a pattern is not a valid regular expression.
    """
    user: ExcludePredicate | None = exclude if callable(exclude) else None
    patterns = [] if user is not None else checks.patterns("exclude", exclude, also="a predicate (name, param) -> bool")
    compiled = [re.compile(p) for p in patterns]

    def predicate(name: str, param: torch.Tensor) -> bool:
        if exclude_1d and param.ndim <= 1:
            return True
        if any(c.search(name) for c in compiled):
            return True
        return bool(user(name, param)) if user is not None else False

    return predicate, patterns


def unmatched_patterns(patterns: Sequence[str], names: Iterable[str]) -> list[str]:
    """The patterns of ``patterns`` that match none of ``names``."""
    names = list(names)
    return [p for p in patterns if not any(re.search(p, n) for n in names)]


class DecoupledDecay:
    """Decoupled weight decay on one optimizer, applied on every step its ledger counts.

    The decay ``λ`` of group ``i`` lives in ``group["weight_decay"]`` between steps, so tools
    that read it (``LearningRateMonitor(log_weight_decay=True)``) show the truth and schedulers
    that write it (``ParamScheduler`` with a ``weight_decay`` field) are obeyed. Around each
    ``optimizer.step()`` that runs:

    * before the update, once the gradients exist (right away, or after the closure of
      ``step(closure)``, see :meth:`attach`): read ``λ`` from the group, apply the decay
      to the group's non-excluded parameters that have a gradient, then set
      ``group["weight_decay"] = 0`` so the optimizer does not add coupled L2 on top;
    * after the update: put ``λ`` back, unless someone wrote the field during the step.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        weight_decay: ``λ`` for every group, or ``"optimizer"`` to take each group's own
            ``weight_decay`` over as its decoupled ``λ`` (groups with 0 stay undecayed).
        mode: ``"lr"``, ``"lr_ratio"``, ``"constant"`` or ``"l2"`` (module docstring).
        lr_ref: ``"lr_ratio"`` reference LR: a number, one per group, or ``None`` for each
            group's ``lr`` when this object is created (pass it explicitly, e.g. ``max_lr``,
            when a warmup schedule has already lowered ``lr`` by then).
        named_parameters: ``(name, param)`` pairs, e.g. ``model.named_parameters()``, to give
            names to the ``exclude`` patterns/predicate (unnamed parameters get ``""``).
        exclude: what not to decay, see :func:`compile_exclude`.
        exclude_1d: exclude parameters with ``ndim <= 1`` (biases, normalisation), default on.
        foreach: use the ``torch._foreach_*`` fast path.
        warn: called with a message when an ``exclude`` pattern matches no parameter of this
            optimizer (``None``: don't check).

    Raises:
        ValueError: bad argument; or a group already has ``weight_decay > 0`` while a number
            ``λ`` is given (that would decay twice; pass ``weight_decay="optimizer"``).

    Example::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        decay = DecoupledDecay(opt, 5e-4, named_parameters=model.named_parameters())
        hooks = decay.attach()          # decays before every opt.step() that runs
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weight_decay: float | Literal["optimizer"],
        mode: str = "lr",
        lr_ref: float | Sequence[float] | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] = (),
        exclude: Exclude = None,
        exclude_1d: bool = True,
        foreach: bool = True,
        warn: Callable[[str], None] | None = warnings.warn,
    ) -> None:
        (self.optimizer,) = check_optimizers([optimizer])
        self.from_optimizer = weight_decay == "optimizer"
        self.weight_decay = None if self.from_optimizer else check_weight_decay(weight_decay)
        self.mode = check_mode(mode)
        self.foreach = checks.boolean("foreach", foreach)
        self._lr_ref_arg = check_lr_ref(lr_ref)
        self._exclude, patterns = compile_exclude(exclude, exclude_1d)
        self._names = {id(p): n for n, p in named_parameters}
        self._decays: dict[int, bool] = {}
        opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        unmatched = unmatched_patterns(patterns, [self._names.get(id(p), "") for p in opt_params])
        for pattern in unmatched if warn is not None else ():
            warn(f"`exclude` pattern {pattern!r} matches no parameter of {type(self.optimizer).__name__}")
        #: per group: λ, the reference LR, and the coefficient applied at the last step.
        self.lambdas: list[float] = []
        self.lr_refs: list[float | None] = []
        self.last_coefficients: list[float] = []
        self._pending: dict[int, tuple[float, float | None]] = {}  # compress_core: saved groups not added yet
        self._adopt_new_groups()

    # -- groups ---------------------------------------------------------------------------
    def _adopt_new_groups(self) -> None:
        """Take ownership of groups not seen yet (all of them at first, later ones added by
        ``add_param_group``, e.g. by a fine-tuning unfreeze)."""
        for index in range(len(self.lambdas), len(self.optimizer.param_groups)):
            group = self.optimizer.param_groups[index]
            own = group.get("weight_decay", 0.0)
            if index in self._pending:  # a group a checkpoint holds, added again after load_state_dict
                lam, ref = self._pending.pop(index)
                self.lambdas.append(lam)
                self.lr_refs.append(ref)
                self.last_coefficients.append(0.0)
                group["weight_decay"] = lam
                continue
            if self.from_optimizer:
                lam = check_weight_decay(own, f"param_groups[{index}]['weight_decay']")
            else:
                if own:
                    raise ValueError(
                        f"{type(self.optimizer).__name__} param group {index} has its own weight_decay="
                        f"{own!r}; with decoupled decay on top it would decay twice. Set the optimizer's "
                        "weight_decay to 0, or pass weight_decay='optimizer' to take that value over "
                        "as the decoupled one"
                    )
                lam = self.weight_decay
            self.lambdas.append(lam)
            if self._lr_ref_arg is None:
                ref = float(group["lr"])
            elif isinstance(self._lr_ref_arg, float):
                ref = self._lr_ref_arg
            else:
                if index >= len(self._lr_ref_arg):
                    raise ValueError(f"`lr_ref` has {len(self._lr_ref_arg)} values but group {index} exists")
                ref = self._lr_ref_arg[index]
            self.lr_refs.append(ref)
            self.last_coefficients.append(0.0)
            group["weight_decay"] = lam

    def _should_decay(self, p: torch.Tensor) -> bool:
        key = id(original_param(p))  # inside a compensated bf16 step: the float32 stand-in's parameter
        if key not in self._decays:
            self._decays[key] = not self._exclude(self._names.get(key, ""), p)
        return self._decays[key]

    def check_coefficients(self) -> list[float]:
        """The coefficient each group would get with its current ``lr`` and ``λ``; raises the
        ``ValueError`` of :func:`decay_coefficient` now (at setup) rather than at the first step."""
        return [
            decay_coefficient(self.mode, lam, group["lr"], ref)
            for group, lam, ref in zip(self.optimizer.param_groups, self.lambdas, self.lr_refs)
        ]

    def write_lambdas(self) -> None:
        """Write the owned ``λ`` values into ``group["weight_decay"]`` (e.g. after an optimizer
        state was loaded from a checkpoint that carries other values)."""
        for group, lam in zip(self.optimizer.param_groups, self.lambdas):
            group["weight_decay"] = lam

    # -- around each step the ledger counts -----------------------------------------------
    def pre_step(self, *_: object) -> None:
        """Read ``λ`` from each group, decay, and zero the group's ``weight_decay`` for the step."""
        self._adopt_new_groups()
        for index, group in enumerate(self.optimizer.param_groups):
            current = group["weight_decay"]
            if current is not _STEP_ZERO:  # else: a previous step raised before post_step ran
                self.lambdas[index] = check_weight_decay(current, f"param_groups[{index}]['weight_decay']")
            coefficient = decay_coefficient(self.mode, self.lambdas[index], group["lr"], self.lr_refs[index])
            apply_weight_decay(
                [p for p in group["params"] if self._should_decay(p)], coefficient, self.mode, self.foreach
            )
            self.last_coefficients[index] = coefficient
            group["weight_decay"] = _STEP_ZERO

    def post_step(self, *_: object) -> None:
        """Put ``λ`` back into every group whose ``weight_decay`` is still our step-time zero."""
        for group, lam in zip(self.optimizer.param_groups, self.lambdas):
            if group["weight_decay"] is _STEP_ZERO:
                group["weight_decay"] = lam

    def attach(self) -> _Subscription:
        """Subscribe :meth:`pre_step` / :meth:`post_step` to the optimizer's
        :class:`~pl_optim.steps.StepLedger`: the decay runs once per step that counts, once its
        gradients exist (after the closure's first call with ``step(closure)``, the order of torch
        AdamW: decay the weights the gradient was taken at) and before the update. Call
        ``.remove()`` on the result to detach."""
        return StepLedger.of(self.optimizer).subscribe(before=self.pre_step, after=self.post_step)

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, list]:
        """``λ`` and ``lr_ref`` per group; ``λ`` as the groups hold it now (a scheduler may have
        written the value for the next step since the last :meth:`pre_step`)."""
        for index, group in enumerate(self.optimizer.param_groups[: len(self.lambdas)]):
            if group["weight_decay"] is not _STEP_ZERO:
                self.lambdas[index] = check_weight_decay(group["weight_decay"], f"param_groups[{index}]['weight_decay']")
        return {"lambdas": list(self.lambdas), "lr_refs": list(self.lr_refs)}

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Restore :meth:`state_dict`; entries for groups not added yet (added later in the run, e.g. by
        ``SelfCompression`` at fit start) are kept and applied when those groups appear."""
        lambdas = [float(x) for x in state["lambdas"]]
        refs = [None if x is None else float(x) for x in state["lr_refs"]]
        n = min(len(lambdas), len(self.lambdas))
        self.lambdas[:n], self.lr_refs[:n] = lambdas[:n], refs[:n]
        self._pending = {i: (lambdas[i], refs[i]) for i in range(n, len(lambdas))}


def check_lr_ref(lr_ref: object) -> float | list[float] | None:
    """Validate ``lr_ref``: ``None``, a number > 0, or a sequence of them (one per group)."""
    if lr_ref is None:
        return None
    values = list(lr_ref) if isinstance(lr_ref, Sequence) and not isinstance(lr_ref, str) else [lr_ref]
    if not values or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in values
    ):
        raise ValueError(f"`lr_ref` must be None, a finite number > 0 or a sequence of them, got {lr_ref!r}")
    floats = [float(v) for v in values]
    return floats if isinstance(lr_ref, Sequence) else floats[0]
