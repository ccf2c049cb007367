"""Lightning side of channel removal: *when* to call :class:`pl_optim.compression.ChannelRemoval`, DDP, logging.

Not a Callback: :class:`~pl_optim.callbacks.SelfCompression` owns one and calls it after every optimizer
step that ran (step ledger). The algorithm (dead channels, constants, plan, surgery with the optimizer
state) is the pure-torch :class:`pl_optim.compression.removal.ChannelRemoval`; here: the example input
for the trace (the LightningModule's first forward), the decision interval, skipping after a non-finite
loss, rank 0's plan broadcast and the DDP wrapper rebuild, one summary line per epoch
(``rank_zero_info``), each event at debug level (python ``logging``) and to the loggers.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from pl_optim.checks import integer, non_negative
from pl_optim.compression.checkpoint import restore_compressed, shrink_to_state_dict
from pl_optim.compression.removal import ChannelRemoval

log = logging.getLogger(__name__)


class RemovalDriver:
    """Decides when the core :class:`ChannelRemoval` runs, and handles DDP and the logs.

    Args:
        interval: decide every this many optimizer steps that ran (``>= 1``).
        shift_decay: the core's L1 proximal step on the constants of dead channels (``>= 0``).
        atol: the core's largest constant a removed channel may leave behind.
    """

    def __init__(self, interval: int = 1, shift_decay: float = 1e-3, atol: float = 1e-6) -> None:
        self.interval = integer("removal_interval", interval, minimum=1)
        self._args = dict(shift_decay=non_negative("shift_decay", shift_decay), atol=non_negative("atol", atol))
        self.core: ChannelRemoval | None = None
        self._example: tuple | None = None
        self._handle = None
        self._bad_loss = False
        self._untraceable = False  # the trace failed: removal (and the column cost) off for this fit
        self._warned: set[str] = set()
        self._epoch: dict[str, int] = {}

    # --- setup ---------------------------------------------------------------------------------
    def setup(self, pl_module: LightningModule, stage: str) -> None:
        """A fit on a new model starts a new record (sizes before training); other stages keep it."""
        if self.core is None or self.core.model is not pl_module:
            self.core = ChannelRemoval(pl_module, **self._args)
        elif stage == "fit":
            self.core.graph = self.core.remover = None
        self._untraceable = False
        self.teardown()
        self._handle = pl_module.register_forward_pre_hook(self._grab)

    def teardown(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _grab(self, module: nn.Module, args: tuple) -> None:
        # under DDP Lightning calls the module with `forward` temporarily patched to `training_step`
        fwd = vars(module).get("forward")
        patched = fwd is not None and getattr(fwd, "__func__", None) is not type(module).forward
        if self._example is None and args and not patched:
            self._example = tuple(a.detach() if torch.is_tensor(a) else a for a in args)

    # --- every optimizer step ------------------------------------------------------------------
    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._bad_loss |= not bool(torch.isfinite(loss.detach()).all())

    def after_step(self, trainer: Trainer, step: int) -> None:
        """After optimizer step number ``step`` (1-based, from the step ledger) ran."""
        bad_loss, self._bad_loss = self._bad_loss, False
        if step % self.interval:
            return
        ddp = isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1
        skip = bad_loss
        if ddp:  # every rank must take the same branch: the broadcast below is a collective
            skip = trainer.strategy.reduce_boolean_decision(skip, all=False)
        if skip:
            self._warn(f"non-finite loss at step {trainer.global_step}; no channel removal at such steps")
            return
        if not self.ensure_traced(trainer.lightning_module):
            return
        core = self.core
        plan = core.plan(trainer.optimizers)
        if ddp:
            plan = trainer.strategy.broadcast({k: v.tolist() for k, v in plan.items()}, src=0)
            plan = {k: torch.tensor(v, dtype=torch.long) for k, v in plan.items()}
        if not plan:
            return
        inner = _drop_ddp(trainer) if ddp else None
        removed = core.apply(plan, trainer.optimizers, step)
        if ddp:
            trainer.strategy.model = trainer.strategy._setup_model(inner)
        for name, n in removed.items():
            self._epoch[name] = self._epoch.get(name, 0) + n
        log.debug("SelfCompression: optimizer step %d: removed channels %s", step,
                  ", ".join(f"{k}: -{v}" for k, v in removed.items()))
        for logger in trainer.loggers:
            logger.log_metrics({f"self_compression/removed/{k}": float(v) for k, v in removed.items()}, step=step)

    def epoch_summary(self, epoch: int) -> None:
        """ONE line for the epoch's removals (nothing when none happened)."""
        if self._epoch:
            total = sum(self._epoch.values())
            rank_zero_info(f"SelfCompression: epoch {epoch}: removed {total} channel(s) ("
                           + ", ".join(f"{k}: -{v}" for k, v in self._epoch.items()) + ")")
        self._epoch = {}

    def ensure_traced(self, pl_module: LightningModule) -> bool:
        """Trace the network for removal once (from the forward grabbed, else `example_input_array`); False
        (one warning) when it cannot be traced yet or at all."""
        if self.core.traced:
            return True
        if self._untraceable:  # tried once and failed: not again every step
            return False
        example = self._example
        if example is None and pl_module.example_input_array is not None:
            example = pl_module.example_input_array
        if example is None:
            self._warn("channel removal needs one call of the LightningModule's forward (or "
                       "`example_input_array`) to trace the network; no removal yet")
            return False
        try:
            unsupported = self.core.trace(example)
        except ValueError as exc:
            self._warn(f"channel removal disabled: {exc}")
            self._untraceable = True
            return False
        for reason in unsupported:
            self._warn(f"channel removal keeps the channels involved in: {reason}")
        return True

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn("SelfCompression: " + message)

    # --- report / state ------------------------------------------------------------------------
    def channel_report(self) -> list[dict[str, Any]]:
        return self.core.channel_report() if self.core is not None else []

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict() if self.core is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.core is not None:
            self.core.load_state_dict(state)


def _drop_ddp(trainer: Trainer) -> nn.Module:
    """Release the DDP wrapper (its reducer holds the parameters and their gradient
    accumulators) so the surgery can give the parameters fresh autograd state; the caller wraps
    the returned module again, with gradient buckets sized for the new shapes."""
    strategy = trainer.strategy
    inner = strategy.model.module
    strategy.model = None
    gc.collect()
    return inner


def _compressed_state_of(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("SelfCompression") and isinstance(state, dict) and "compressed" in state:
            return state["compressed"]
    return None


def load_compressed(module_cls: type[LightningModule], checkpoint_path: str, **kwargs: Any) -> LightningModule:
    """The trained self-compressed network of a checkpoint written with :class:`SelfCompression`: the
    quantisers and the genuinely smaller layers (channels removed), ready for
    :func:`~pl_optim.compression.export_compressed` / :func:`~pl_optim.compression.save_packed`.

    ``module_cls.load_from_checkpoint(checkpoint_path)`` gives the same outputs in the plain full-size
    architecture (removed channels as zeros); this helper then applies the callback's saved state
    (:func:`~pl_optim.compression.checkpoint.restore_compressed`). Checkpoints of earlier versions (the
    quantised layout in ``state_dict``) are shrunk to their shapes before loading.

    Example::

        model = load_compressed(MyModule, "epoch=9.ckpt")
    """
    captured: dict[str, Any] = {}

    class _Loader(module_cls):  # type: ignore[misc, valid-type]
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            super().on_load_checkpoint(checkpoint)
            captured["state"] = _compressed_state_of(checkpoint)
            shrink_to_state_dict(self, checkpoint["state_dict"])  # earlier, quantised-layout checkpoints

    model = _Loader.load_from_checkpoint(checkpoint_path, **kwargs)
    model.__class__ = module_cls
    if captured.get("state") is not None:
        restore_compressed(model, captured["state"])
    return model

