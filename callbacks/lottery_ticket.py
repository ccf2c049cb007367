"""Lightning front end of :mod:`pl_optim.lottery`: train one round of a lottery-ticket search."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from pl_optim.callbacks._base import StepHookCallback, refuse_sharded_strategy
from pl_optim.callbacks._schedule_length import derive_total_steps
from pl_optim.checks import integer, patterns
from pl_optim.compression.surgery import apply_kept, match_shapes
from pl_optim.lottery.masks import MaskSet, check_masks, prunable_weights, remaining
from pl_optim.lottery.rewind import clear_optimizer_state, reinitialize
from pl_optim.lottery.structured import kept_from_lists, kept_to_lists, parameter_count


def check_rewind_to(value: object) -> int:
    """``"init"`` (step 0) or an optimizer step ``k >= 0``; returns ``k``."""
    if value == "init":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`rewind_to` must be 'init' or an optimizer step >= 0, got {value!r}")
    return value


def _count(weights: Mapping[str, torch.Tensor]) -> int:
    return sum(w.numel() for w in weights.values())


class LotteryTicket(StepHookCallback):
    """One round of a lottery-ticket search: train with pruned weights (or removed channels)
    held at exactly zero, starting from the rewind point.

    At train start (after Lightning restored a checkpoint, e.g. the rewind point): the removed
    channels of ``kept`` are cut out of the model and the optimizer state (channel surgery);
    with ``reinit_seed`` the weights are re-drawn and the optimizer's moments dropped (the
    random re-initialisation control); then ``masks`` are applied to the weights and every
    optimizer state tensor. On every optimizer step that runs (the step ledger), gradients of
    pruned weights are zeroed before the update and weights/state after it (see
    :class:`pl_optim.lottery.MaskSet`), so momentum and decoupled decay cannot revive them.
    With ``rewind_path``, a real Lightning checkpoint is written when the step-``rewind_to``
    state is reached (before any step for ``"init"``): ``Trainer.fit(ckpt_path=rewind_path)``
    then starts a later round with the weights, optimizer, loops and every callback's state
    (schedules, decay) of that step. Logs ``lottery/round``, ``lottery/remaining`` (fraction
    of prunable weights kept) and ``lottery/params`` to every logger at train start.

    Use :func:`~pl_optim.callbacks.find_ticket` to run the rounds.

    Args:
        masks: parameter name -> bool mask (``None``: dense; from a checkpoint when resuming).
        kept: channel-removal record (layer -> ``{"out"/"in": full-size indices kept}``).
        layers: regular expressions of the Conv/Linear layers that are pruned (``None``: all).
        exclude: regular expressions of layers not pruned.
        rewind_to: ``"init"`` or the optimizer step ``k`` whose state ``rewind_path`` captures.
        rewind_path: where to write the rewind checkpoint (``None``: none).
        reinit_seed: re-initialise the weights from this seed at train start (control).
        round_index: the round number (logged).

    Raises:
        ValueError: a bad argument; at fit start, masks that do not fit the model, a layer
            pattern that matches nothing, a model without prunable layers, ``rewind_to``
            beyond the run's length; on resume, a checkpoint with other masks.

    Example::

        trainer = Trainer(max_epochs=5, callbacks=[LotteryTicket(masks=masks)])
        trainer.fit(model, ckpt_path="rewind.ckpt")
    """

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor] | None = None,
        kept: Mapping[str, Mapping[str, Any]] | None = None,
        layers: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        rewind_to: int | str = "init",
        rewind_path: str | os.PathLike | None = None,
        reinit_seed: int | None = None,
        round_index: int = 0,
    ) -> None:
        self.masks = {n: torch.as_tensor(m, dtype=torch.bool) for n, m in masks.items()} if masks is not None else None
        self.kept = kept_from_lists(kept) if kept else {}
        self.layers, self.exclude = patterns("layers", layers) or None, patterns("exclude", exclude) or None
        self.rewind_step = check_rewind_to(rewind_to)
        self.rewind_path = Path(rewind_path) if rewind_path is not None else None
        self.reinit_seed = integer("reinit_seed", reinit_seed, allow_none=True)
        self.round_index = integer("round_index", round_index, minimum=0)
        self.holder: MaskSet | None = None
        self.rewound = False  # whether the rewind checkpoint was written in this fit
        self._writing_rewind = False
        self._full = 1  # prunable weights of the full-size model
        self._mid_round = False  # resumed from a checkpoint taken inside this round (not the rewind point)

    # -- fit ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # a checkpoint taken inside a structured round holds shrunk layers: shrink the fresh
        # full-size model to the saved shapes before Lightning copies the weights in
        self._match_hook = pl_module.register_load_state_dict_pre_hook(
            lambda module, state_dict, prefix, *args: match_shapes(module, state_dict, prefix))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        refuse_sharded_strategy(trainer, "LotteryTicket")
        weights = prunable_weights(pl_module, self.layers, self.exclude)  # errors name the pattern
        if self.masks is not None and not self.kept:
            check_masks(weights, self.masks)
        self.rewound = False
        super().on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.rewind_path is not None:
            total = derive_total_steps(trainer, len(trainer.optimizers))
            if self.rewind_step >= total:
                raise ValueError(
                    f"`rewind_to`={self.rewind_step} is beyond the first round's length of {total} optimizer "
                    "steps; rewind to an earlier step (or 'init')"
                )
        if not self._mid_round:
            self._full = _count(prunable_weights(pl_module, self.layers, self.exclude))  # full size
        if self.kept and not self._mid_round:
            apply_kept(pl_module, self.kept, trainer.optimizers)  # the rewind point, shrunk
        if self.reinit_seed is not None and not self._mid_round:
            reinitialize(pl_module, self.reinit_seed)
            clear_optimizer_state(trainer.optimizers)  # moments belong to the rewound weights
        weights = prunable_weights(pl_module, self.layers, self.exclude)
        self.holder = MaskSet(weights, self.masks) if self.masks is not None and not self.kept else None
        if self.holder is not None:
            self.holder.apply(trainer.optimizers)
        if self.rewind_path is not None and self.rewind_step == 0:
            self._write_rewind(trainer)
        kept = remaining(self.holder.masks)["total"] if self.holder is not None else _count(weights) / self._full
        metrics = {"lottery/round": float(self.round_index), "lottery/remaining": kept,
                   "lottery/params": float(parameter_count(pl_module))}
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"LotteryTicket: round {self.round_index}, {100 * kept:.2f}% of the prunable weights, "
                       f"{int(metrics['lottery/params'])} parameters")

    def before_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        if self.holder is not None:
            self.holder.mask_gradients(optimizer)

    def after_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        if self.holder is not None:
            self.holder.mask_weights(optimizer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.rewind_path is not None and not self.rewound and self.position(0) >= self.rewind_step:
            self._write_rewind(trainer)

    def _write_rewind(self, trainer: Trainer) -> None:
        self.rewind_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.rewind_path.with_name(self.rewind_path.name + ".tmp")
        self._writing_rewind = True
        try:
            trainer.save_checkpoint(tmp)
        finally:
            self._writing_rewind = False
        if trainer.is_global_zero:
            os.replace(tmp, self.rewind_path)  # atomic: a kill leaves the old file or the new one
        self.rewound = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if getattr(self, "_match_hook", None) is not None:
            self._match_hook.remove()
            self._match_hook = None
        self._mid_round = False

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._writing_rewind:  # the rewind point belongs to every round: no masks in it
            return {"rewind_point": True, "positions": self.step_positions()}
        masks = self.holder.masks if self.holder is not None else self.masks
        return {
            "rewind_point": False,
            "positions": self.step_positions(),
            "round": self.round_index,
            "masks": {n: m.cpu() for n, m in masks.items()} if masks is not None else None,
            "kept": kept_to_lists(self.kept),
            "full": self._full,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_step_positions(state_dict.get("positions", []))
        if state_dict.get("rewind_point", False):
            return  # masks and channels come from this round's arguments
        self._mid_round = True
        saved = state_dict.get("masks")
        if saved is not None and self.masks is not None:
            if set(saved) != set(self.masks) or any(not torch.equal(saved[n].cpu(), self.masks[n].cpu()) for n in saved):
                raise ValueError(
                    "the checkpoint's LotteryTicket masks differ from the `masks` given (resuming with other "
                    "settings); pass masks=None to take the checkpoint's"
                )
        if saved is not None:
            self.masks = {n: m.bool() for n, m in saved.items()}
        self._full = int(state_dict.get("full", self._full))
        if state_dict.get("kept"):
            self.kept = kept_from_lists(state_dict["kept"])
