"""Lightning front end of :class:`pl_optim.weight_decay.DecoupledDecay`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from pl_optim import checks
from pl_optim.callbacks._base import (
    StepHookCallback,
    group_metric_names,
    log_step_metrics,
    refuse_sharded_strategy,
)
from pl_optim.steps import StepLedger
from pl_optim.weight_decay import (
    DecoupledDecay,
    Exclude,
    check_lr_ref,
    check_mode,
    check_weight_decay,
    compile_exclude,
    unmatched_patterns,
)


class DecoupledWeightDecay(StepHookCallback):
    r"""Decoupled weight decay for any torch optimizer (Loshchilov & Hutter).

    Right before every optimizer step that actually runs (never on gradient-accumulation
    micro-batches nor on GradScaler-skipped fp16 steps), in the order of ``torch.optim.AdamW``:

    * ``mode="lr"``:       :math:`w \leftarrow w\,(1 - \eta\lambda)`  (torch AdamW, fastai)
    * ``mode="lr_ratio"``: :math:`w \leftarrow w\,(1 - \tfrac{\eta}{\eta_{ref}}\lambda)` (Composer)
    * ``mode="constant"``: :math:`w \leftarrow w\,(1 - \lambda)`
    * ``mode="l2"``:       :math:`g \leftarrow g + \lambda w` (coupled L2, for comparisons)

    ``λ`` lives in ``group["weight_decay"]`` between steps (so ``LearningRateMonitor(
    log_weight_decay=True)`` shows it and ``ParamScheduler`` can schedule it) and is 0 while
    ``optimizer.step()`` runs, so the optimizer adds no coupled L2 on top. Checkpoints store ``λ``
    in this callback's state and ``weight_decay=0`` in the optimizer's, so a checkpoint loaded
    without the callback never turns into coupled L2. The effective decay per group
    (``lr·λ``, ``lr/lr_ref·λ`` or ``λ``) is logged each step as ``"wd_effective-<Optimizer>"``
    (``/pgN`` per group with several groups).

    Args:
        weight_decay: ``λ`` >= 0 for every param group, or ``"optimizer"`` to take each group's
            own ``weight_decay`` over as its decoupled ``λ`` (and zero it in the optimizer).
        mode: ``"lr"``, ``"lr_ratio"``, ``"constant"`` or ``"l2"``.
        exclude: regular expression(s) matched (``re.search``) against parameter names, or a
            predicate ``(name, param) -> bool``; matching parameters are not decayed. A pattern
            that matches nothing warns.
        exclude_1d: also exclude every parameter with ``ndim <= 1`` (biases, normalisation
            scales and shifts); default ``True``.
        lr_ref: reference LR of ``"lr_ratio"``: a number, one per param group, or ``None`` for each
            group's ``lr`` at fit start (pass e.g. ``max_lr`` when a warmup has lowered ``lr`` by then).
        foreach: use the ``torch._foreach_*`` fast path (``False``: plain loop).
        log: send the effective decay per group to the trainer's loggers after each step that
            ran (every ``log_every_n_steps``).

    Raises:
        ValueError: a bad argument (at construction); at fit start, a param group whose own
            ``weight_decay > 0`` while ``weight_decay`` is a number (double decay).
        RuntimeError: a sharded strategy (FSDP, DeepSpeed).

    Example::

        model = MyModule()                      # configure_optimizers: Adam(..., weight_decay=0)
        trainer = Trainer(callbacks=[DecoupledWeightDecay(0.3, mode="lr")])
    """

    def __init__(
        self,
        weight_decay: float | Literal["optimizer"],
        mode: str = "lr",
        exclude: Exclude = None,
        exclude_1d: bool = True,
        lr_ref: float | Sequence[float] | None = None,
        foreach: bool = True,
        log: bool = True,
    ) -> None:
        if weight_decay != "optimizer":
            check_weight_decay(weight_decay)
        self.weight_decay = weight_decay
        self.mode = check_mode(mode)
        self.exclude_1d = checks.boolean("exclude_1d", exclude_1d)
        compile_exclude(exclude, exclude_1d)  # validates
        self.exclude = exclude
        self.lr_ref = check_lr_ref(lr_ref)
        self.foreach, self.log = checks.boolean("foreach", foreach), checks.boolean("log", log)
        self.decays: list[DecoupledDecay] = []
        self._loaded: list[dict] | None = None
        self._hooks: list = []
        self._logged_steps: list[int] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        refuse_sharded_strategy(trainer, "DecoupledWeightDecay")
        names = list(pl_module.named_parameters())
        self.decays = [
            DecoupledDecay(
                opt, self.weight_decay, self.mode, self.lr_ref, names, self.exclude, self.exclude_1d,
                self.foreach, warn=None,
            )
            for opt in trainer.optimizers
        ]
        _, patterns = compile_exclude(self.exclude, self.exclude_1d)
        by_id = {id(p): n for n, p in names}
        opt_names = [by_id.get(id(p), "") for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
        for pattern in unmatched_patterns(patterns, opt_names):
            rank_zero_warn(f"DecoupledWeightDecay: `exclude` pattern {pattern!r} matches no optimized parameter")
        if self._loaded is not None:
            for decay, state in zip(self.decays, self._loaded):
                decay.load_state_dict(state)
        self._remove_hooks()
        self._hooks = [decay.attach() for decay in self.decays]  # on each optimizer's step ledger
        self._ledgers = [StepLedger.of(opt) for opt in trainer.optimizers]
        self._logged_steps = [ledger.steps for ledger in self._ledgers]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # positions (the decay itself runs on the ledger)
        # An optimizer state restored from a checkpoint carries weight_decay=0 (see
        # on_save_checkpoint): put λ back where the ecosystem reads it. Fresh runs already hold λ
        # since fit start (and may hold a ParamScheduler's first value, which must not be undone).
        if trainer.ckpt_path is not None:
            for decay in self.decays:
                decay.write_lambdas()
        for index, decay in enumerate(self.decays):  # e.g. λ too large for the lr: fail now, not at step 1
            try:
                decay.check_coefficients()
            except ValueError as err:
                raise ValueError(f"DecoupledWeightDecay, optimizer {index}: {err}") from None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        names = group_metric_names("wd_effective", trainer.optimizers) if self.log else []
        metrics = {}
        for index, (decay, ledger) in enumerate(zip(self.decays, self._ledgers)):
            if self.log and ledger.steps != self._logged_steps[index]:  # a step ran in this batch
                metrics.update(zip(names[index], decay.last_coefficients))
            self._logged_steps[index] = ledger.steps
        log_step_metrics(trainer, metrics)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hooks in self._hooks:
            hooks.remove()
        self._hooks = []

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        for decay, opt_state in zip(self.decays, checkpoint.get("optimizer_states", [])):
            for group in opt_state.get("param_groups", [])[: len(decay.lambdas)]:
                group["weight_decay"] = 0.0

    def state_dict(self) -> dict[str, Any]:
        decays = [d.state_dict() for d in self.decays] if self.decays else self._loaded or []
        return {"optimizers": decays, "steps": self.step_positions()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict["optimizers"])
        if "steps" in state_dict:
            self.load_step_positions(state_dict["steps"])
        for decay, state in zip(self.decays, self._loaded):
            decay.load_state_dict(state)
