"""ParamScheduler: drive any param-group field on the optimizer steps that actually ran."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from pl_optim import checks
from pl_optim.callbacks._base import StepHookCallback, refuse_sharded_strategy
from pl_optim.callbacks._schedule_length import derive_total_steps
from pl_optim.param_groups import GroupWriter
from pl_optim.plateau import Plateau
from pl_optim.schedules import Schedule

RESUME = ("checkpoint", "trainer")
#: torch schedulers that also write momentum/betas when ``cycle_momentum`` is on.
_MOMENTUM_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


class ParamScheduler(StepHookCallback):
    r"""Set param-group hyper-parameters from schedules of the optimizer steps that actually ran.

    For optimizer :math:`o`, param group :math:`g` and field :math:`k`, before optimizer step
    :math:`n` (the number of steps of :math:`o` that already ran, held at :math:`T-1` past the
    end): :math:`\text{group}_g[k] = m_{k,g}\, s_{k,g}(\min(n, T-1), T)`.
    Values are written in ``on_train_start`` (after a checkpoint restored the optimizer, so
    resumed runs continue exactly) and after each step that ran, for the next one (the optimizer's
    :class:`~pl_optim.steps.StepLedger`: gradient-accumulation micro-batches, GradScaler-skipped
    steps and steps that updated nothing never advance the position). The after-step hook is
    subscribed in ``on_train_start``, after the ``on_fit_start`` subscriptions of other callbacks,
    so a callback that zeroes ``weight_decay`` around the step and puts it back afterwards
    (decoupled decay) sees this scheduler's value at the next step. Param groups added during
    training follow the rule of :mod:`pl_optim.param_groups` from their first step.

    The total :math:`T` is ``total_steps`` or :func:`derive_total_steps`. It is saved in the
    checkpoint with the counters. Resuming with a different ``max_epochs``/``max_steps``:
    ``on_resume="checkpoint"`` (default, like torch's ``OneCycleLR`` whose ``total_steps`` is in
    its state) keeps the saved :math:`T` — the run follows the schedule it started with and holds
    the final values in any extra steps; ``on_resume="trainer"`` recomputes :math:`T` from the
    new configuration and continues from the saved counter (the values jump to the new curve).
    Either way a differing total is reported with a warning. A new ``fit`` without a checkpoint
    starts the schedule again at step 0.

    A schedule may be a :class:`~pl_optim.plateau.Plateau` (reduce-on-plateau for any field):
    at every ``on_train_epoch_end`` it is fed ``trainer.callback_metrics[plateau.monitor]``
    (after that epoch's validation; rank 0's value under DDP) and its new value is written at
    once. Its state is in the checkpoint. A monitored metric that was never logged raises at the
    first epoch end, naming the metric and the ones available.

    Args:
        schedules: field -> schedule, or a list of one schedule per param group. Fields:
            ``"lr"``, ``"momentum"`` (``betas[0]`` on Adam-likes), ``"betas[0]"``/``"beta1"``,
            ``"betas[1]"``/``"beta2"``, ``"weight_decay"`` or any custom param-group key.
        multipliers: field -> one factor per param group (discriminative learning rates), or
            ``"initial"``: each group's value at the start of training (saved in the checkpoint),
            so that e.g. ``{"lr": Cosine(1.0, 0.01)}`` scales the lrs ``configure_optimizers`` set.
        total_steps: schedule length in optimizer steps (one int, or one per optimizer);
            default: derived from the Trainer.
        optimizers: indices of the optimizers to drive (default: all); each has its own counter.
        on_resume: ``"checkpoint"`` or ``"trainer"`` (see above).

    Raises:
        ValueError: a bad argument; at fit start, a field the optimizer lacks, a per-group list
            of the wrong length, a torch LR scheduler on the same optimizer, or two schedulers
            driving the same field.

    Example::

        from pl_optim.schedules import Cosine, Warmup, Constant
        sched = ParamScheduler(
            {"lr": Warmup(Cosine(3e-3, 1e-5), 0.05), "weight_decay": Cosine(0.1, 0.01)},
            multipliers={"lr": [0.1, 1.0]},  # backbone group, head group
        )
        Trainer(callbacks=[sched, LearningRateMonitor(log_momentum=True, log_weight_decay=True)])
    """

    def __init__(
        self,
        schedules: Mapping[str, Schedule | Sequence[Schedule]],
        multipliers: Mapping[str, Sequence[float] | str] | None = None,
        total_steps: int | Sequence[int] | None = None,
        optimizers: int | Sequence[int] | None = None,
        on_resume: str = "checkpoint",
    ) -> None:
        if not isinstance(schedules, Mapping) or not schedules:
            raise ValueError(f"`schedules` must be a non-empty dict field -> schedule, got {schedules!r}")
        for field, s in schedules.items():
            items = s if isinstance(s, (list, tuple)) else [s]
            if not isinstance(field, str) or not items or not all(callable(x) for x in items):
                raise ValueError(f"`schedules[{field!r}]` must be a schedule or a list of schedules, got {s!r}")
        if multipliers is not None and (
            not isinstance(multipliers, Mapping)
            or any(isinstance(m, str) and m != "initial" for m in multipliers.values())
        ):
            raise ValueError(f"`multipliers` must be a dict field -> per-group factors or 'initial', got {multipliers!r}")
        self.schedules, self.multipliers = dict(schedules), dict(multipliers or {})
        self._init_common(total_steps, optimizers, on_resume)

    def _init_common(self, total_steps: Any, optimizers: Any, on_resume: str) -> None:
        totals = [total_steps] if isinstance(total_steps, int) and not isinstance(total_steps, bool) else total_steps
        if totals is not None:
            if not isinstance(totals, (list, tuple)) or not totals:
                raise ValueError(f"`total_steps` must be a positive int or a list of them, got {total_steps!r}")
            named = len(totals) > 1 or not isinstance(total_steps, int)
            totals = [checks.integer(f"total_steps[{k}]" if named else "total_steps", t, minimum=1)
                      for k, t in enumerate(totals)]
        indices = checks.indices("optimizers", optimizers)
        checks.one_of("on_resume", on_resume, RESUME)
        self.total_steps, self.optimizer_indices, self.on_resume = totals, indices, on_resume
        self.totals: list[int] = []
        self._loaded: dict[str, Any] | None = None
        self._writers: dict[int, GroupWriter] = {}
        self._slots: dict[int, int] = {}
        self._warned: set[int] = set()
        self._rewrite = False
        self._state_key: str | None = None
        self._initial: dict[str, list[float]] = {}  # "initial" multipliers, "<optimizer>/<field>"

    @property
    def state_key(self) -> str:
        # Lightning reads state_key around every hook call: build it once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(fields=sorted(self.schedules), optimizers=self.optimizer_indices)
        return self._state_key

    # -- what to write (OneCycle overrides this) ----------------------------------------------
    def schedules_for(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """``(schedules, multipliers)`` for one optimizer (subclasses build them from its groups)."""
        return self.schedules, self.multipliers

    # -- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Hooks are subscribed in on_train_start (see the class docstring), not here.
        refuse_sharded_strategy(trainer, type(self).__name__)
        selected = self._selected(trainer)
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if sched.optimizer in selected and self._conflicts(sched):
                raise ValueError(
                    f"{type(self).__name__} drives {sorted(self.schedules)} of the optimizer that "
                    f"configure_optimizers also gives the torch scheduler {type(sched).__name__}; both would "
                    "write the same param-group values. Return only the optimizer, or schedule other fields."
                )

    def _conflicts(self, sched: object) -> bool:
        fields = set(self.schedules)
        momentum = bool(fields & {"momentum", "beta1", "betas[0]"}) and isinstance(sched, _MOMENTUM_SCHEDULERS)
        return "lr" in fields or momentum

    def _selected(self, trainer: Trainer) -> list[torch.optim.Optimizer]:
        opts = trainer.optimizers
        indices = self.optimizer_indices if self.optimizer_indices is not None else range(len(opts))
        return [opts[checks.optimizer_in_range("optimizers", i, len(opts))] for i in indices]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not getattr(self, "_plateaus_loaded", False):  # a new fit starts over, a resumed one continues
            for plateau in self._plateaus():
                plateau.reset()
        self._plateaus_loaded = False
        opts = trainer.optimizers
        indices = list(self.optimizer_indices if self.optimizer_indices is not None else range(len(opts)))
        self._selected(trainer)
        self._slots = {i: slot for slot, i in enumerate(indices)}
        self._writers = {}
        for i in indices:
            schedules, multipliers = self.schedules_for(trainer, opts[i])
            saved = (self._loaded or {}).get("initial", {})  # "initial" factors of the resumed run
            multipliers = {f: saved.get(f"{i}/{f}", m) if m == "initial" else m for f, m in multipliers.items()}
            try:
                self._writers[i] = GroupWriter(opts[i], schedules, multipliers)
            except ValueError as err:
                raise ValueError(f"{type(self).__name__}, optimizer {i}: {err}") from err
        self._initial = self._initial_multipliers()
        self._check_overlap(trainer)
        steps, self.totals = self._resume_state(trainer, len(indices))
        if steps is not None:  # resumed: positions continue from the checkpoint
            self.load_step_positions([steps[self._slots[i]] if i in self._slots else 0 for i in range(len(opts))])
        super().on_train_start(trainer, pl_module)
        self._warned = set()
        self._write_all()
        self._rewrite = True
        self._subscribe(trainer)  # the step hooks are registered now (class docstring)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Write the first values once more: another callback's on_train_start (e.g. one putting
        # back its own view of weight_decay after a resume) may have run after ours.
        if self._rewrite:
            self._rewrite = False
            self._write_all()

    def _write_all(self) -> None:
        for i, writer in self._writers.items():
            self._apply(i, writer)

    def _apply(self, index: int, writer: GroupWriter, only_new: bool = False) -> None:
        total = self.totals[self._slots[index]]
        try:
            writer.apply(min(self.position(index), total - 1), total, only_new)
        except ValueError as err:  # a param group added during training that cannot be placed
            raise ValueError(f"{type(self).__name__}, optimizer {index}: {err}") from None

    def _check_overlap(self, trainer: Trainer) -> None:
        mine = {(i, k) for i, w in self._writers.items() for k in w.keys.values()}
        for cb in trainer.callbacks:
            if cb is not self and isinstance(cb, ParamScheduler) and cb._writers:
                theirs = {(i, k) for i, w in cb._writers.items() for k in w.keys.values()}
                if mine & theirs:
                    raise ValueError(
                        f"{type(self).__name__} and {type(cb).__name__} both schedule (optimizer, field) "
                        f"{sorted(mine & theirs)}; give each field to one scheduler"
                    )

    def _resume_state(self, trainer: Trainer, n: int) -> tuple[list[int] | None, list[int]]:
        if self.total_steps is not None:
            derived = list(self.total_steps) * (n if len(self.total_steps) == 1 else 1)
            if len(derived) != n:
                raise ValueError(f"`total_steps` has {len(self.total_steps)} values for {n} scheduled optimizers")
        else:
            derived = [derive_total_steps(trainer, len(trainer.optimizers))] * n
        if self._loaded is None:
            return None, derived
        steps, totals = list(self._loaded["steps"]), list(self._loaded["totals"])
        self._loaded = None
        if len(steps) != n:
            raise ValueError(f"the checkpoint of {type(self).__name__} has {len(steps)} optimizers, the run has {n}")
        if totals != derived:
            keep = self.on_resume == "checkpoint"
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's schedule length {totals} differs from this run's "
                f"{derived} (max_epochs/max_steps changed?); on_resume={self.on_resume!r}: "
                + ("keeping the checkpoint's length, final values are held past its end"
                   if keep else "using this run's length from the saved step counter")
            )
            totals = totals if keep else derived
        return steps, totals

    #: the before-step hook (placing groups added since the last step) runs ahead of other callbacks'
    #: so they read this step's values; the after-step hook keeps its place (class docstring)
    early_subscriber = True

    def before_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        # A group added since the last step (an unfreeze) gets this step's values before its first update.
        writer = self._writers.get(index)
        if writer is not None and len(optimizer.param_groups) != writer.n_groups:
            self._apply(index, writer, only_new=True)

    def after_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        writer = self._writers.get(index)
        if writer is None:
            return
        step, total = self.position(index), self.totals[self._slots[index]]
        if step > total and index not in self._warned:  # a step ran past the end
            self._warned.add(index)
            rank_zero_warn(
                f"{type(self).__name__}: optimizer {index} made {step} steps, past the end of its schedule "
                f"({total} steps); holding the final values"
            )
        self._apply(index, writer)

    def _plateaus(self) -> list[Plateau]:
        found = [s for v in self.schedules.values() for s in (v if isinstance(v, (list, tuple)) else [v])
                 if isinstance(s, Plateau)]
        return list({id(p): p for p in found}.values())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plateaus = self._plateaus()
        for plateau in plateaus:
            if plateau.monitor not in trainer.callback_metrics:
                raise ValueError(
                    f"{type(self).__name__}: Plateau monitors {plateau.monitor!r}, which was not logged by the end of "
                    f"epoch {trainer.current_epoch}; logged metrics: {sorted(trainer.callback_metrics)}"
                )
            plateau.update(trainer.strategy.broadcast(float(trainer.callback_metrics[plateau.monitor]), src=0))
        if plateaus:
            self._write_all()

    @property
    def steps(self) -> list[int]:
        """Optimizer steps that ran, per scheduled optimizer (:meth:`position`)."""
        indices = sorted(self._slots, key=self._slots.get) if self._slots else []
        return [self.position(i) for i in indices] if indices else self._saved_steps()

    def _saved_steps(self) -> list[int]:
        return list((self._loaded or {}).get("steps", []))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._writers:  # keep the factors of groups adopted during training for a later save
            self._initial = self._initial_multipliers()
        self._writers = {}

    def state_dict(self) -> dict[str, Any]:
        if self._writers:  # groups adopted during training add their factors
            self._initial = self._initial_multipliers()
        state = {"steps": self.steps, "totals": list(self.totals), "initial": dict(self._initial)}
        if self._plateaus():
            state["plateaus"] = [p.state_dict() for p in self._plateaus()]
        return state

    def _initial_multipliers(self) -> dict[str, list[float]]:
        """The factors of ``"initial"`` multipliers, per ``"<optimizer>/<field>"`` (checkpointed)."""
        return {f"{i}/{f}": list(w.multipliers[f]) for i, w in self._writers.items()
                for f, m in self.multipliers.items() if m == "initial"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = {"steps": [int(s) for s in state_dict["steps"]], "totals": [int(t) for t in state_dict["totals"]],
                        "initial": {k: [float(v) for v in vs] for k, vs in state_dict.get("initial", {}).items()}}
        for plateau, saved in zip(self._plateaus(), state_dict.get("plateaus", [])):
            plateau.load_state_dict(saved)
            self._plateaus_loaded = True
