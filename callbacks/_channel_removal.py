"""Lightning side of channel removal: the helper object :class:`SelfCompression` delegates to.

Not a Callback: it decides on the optimizer steps that ran (called from SelfCompression's step
hook), shrinks the network and the optimizer state (:mod:`pl_optim.compression.surgery`),
rebuilds the DDP wrapper, and makes checkpoints taken after removals load into a freshly built
full-size model (a ``load_state_dict`` pre-hook shrinks the layers to the saved shapes before
Lightning copies the weights — Lightning restores the model before any callback state).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from pl_optim.checks import non_negative
from pl_optim.compression.graph import ChannelGraph, output_size
from pl_optim.compression.quantizer import dead_channels, quantize, quantized_layers
from pl_optim.compression.surgery import ChannelRemover, match_shapes, shrink_constants

_SIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ChannelRemoval:
    """Remove dead channels during training (see ``docs/channel_removal.md``).

    Every ``interval`` optimizer steps that ran: channels dead in every coupled producer
    (quantiser rule :func:`~pl_optim.compression.quantizer.dead_channels`, weight rows exactly 0)
    get a proximal L1 step of ``shift_decay`` on their constants (bias, BatchNorm shift); those
    whose constant is now 0 at every consumer (``atol`` for eval-mode running means still
    decaying) are removed. Under DDP rank 0's decision is broadcast and the wrapper rebuilt.

    Args:
        interval: decide every this many optimizer steps (>= 1).
        shift_decay: L1 proximal step on the constants of dead channels per decision (>= 0).
        atol: largest constant a removed channel may leave behind (>= 0).

    Raises:
        ValueError: a bad argument.
    """

    def __init__(self, interval: int = 1, shift_decay: float = 1e-3, atol: float = 1e-6) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"`removal_interval` must be an integer >= 1, got {interval!r}")
        self.interval = interval
        self.shift_decay = non_negative("shift_decay", shift_decay)
        self.atol = non_negative("atol", atol)
        self.kept: dict[str, dict[str, torch.Tensor]] = {}
        self.original: dict[str, int] = {}
        self.events: list[tuple[int, str, int]] = []
        self.graph: ChannelGraph | None = None
        self.remover: ChannelRemover | None = None
        self._example: tuple | None = None
        self._handles: list = []
        self._bad_loss = False
        self._warned: set[str] = set()

    # --- setup / teardown ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str = "fit") -> None:
        """Register the hooks (every stage: validate/test with ``ckpt_path`` must load too); a
        ``fit`` also starts a new record of the sizes before training."""
        self.teardown()
        if stage == "fit":
            self.graph = self.remover = None
            self.original = {n: output_size(m) for n, m in pl_module.named_modules() if isinstance(m, _SIZED)}
        self._handles = [
            pl_module.register_forward_pre_hook(self._grab),
            pl_module.register_load_state_dict_pre_hook(self._match),
        ]

    def teardown(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _grab(self, module: nn.Module, args: tuple) -> None:
        # under DDP Lightning calls the module with `forward` temporarily patched to `training_step`
        fwd = vars(module).get("forward")
        patched = fwd is not None and getattr(fwd, "__func__", None) is not type(module).forward
        if self._example is None and args and not patched:
            self._example = tuple(a.detach() if torch.is_tensor(a) else a for a in args)

    @staticmethod
    def _match(module, state_dict, prefix, *args) -> None:
        match_shapes(module, state_dict, prefix)

    # --- every optimizer step ------------------------------------------------------------------
    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._bad_loss |= not bool(torch.isfinite(loss.detach()).all())

    def after_step(self, trainer: Trainer, pl_module: LightningModule, repaired: int, step: int) -> None:
        """After optimizer step number ``step`` (1-based, from the step ledger) ran."""
        bad_loss, self._bad_loss = self._bad_loss, False
        if step % self.interval:
            return
        ddp = isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1
        skip = bool(repaired or bad_loss)
        if ddp:  # every rank must take the same branch: the broadcast below is a collective
            skip = trainer.strategy.reduce_boolean_decision(skip, all=False)
        if skip:
            rank_zero_warn(f"SelfCompression: non-finite bits/exponent or loss at step {trainer.global_step}; "
                           "no channel removal this step")
            return
        if not self._ensure_graph(pl_module):
            return
        graph = self.graph
        dead = self.dead(pl_module)
        shrink_constants(graph, graph.dead_in_all(dead), self.shift_decay, trainer.optimizers)
        plan = graph.removable(dead, self.atol)
        if ddp:
            plan = trainer.strategy.broadcast({k: v.tolist() for k, v in plan.items()}, src=0)
            plan = {k: torch.tensor(v, dtype=torch.long) for k, v in plan.items()}
        if not plan:
            return
        inner = _drop_ddp(trainer) if ddp else None
        removed = self.remover.remove(plan, trainer.optimizers)
        self.kept = self.remover.kept
        if ddp:
            trainer.strategy.model = trainer.strategy._setup_model(inner)
        for name, n in removed.items():
            self.events.append((step, name, n))
        rank_zero_info(f"SelfCompression: optimizer step {step}: removed channels "
                       + ", ".join(f"{k}: -{v}" for k, v in removed.items()))
        for logger in trainer.loggers:
            logger.log_metrics({f"self_compression/removed/{k}": float(v) for k, v in removed.items()}, step=step)

    @staticmethod
    def dead(pl_module: nn.Module) -> dict[str, torch.Tensor]:
        """Quantised layer -> bool ``[C_out]``: dead by the quantiser's rule AND a zero weight row.

        Runs every decision, so only the rows of channels dead by the rule are quantised (without
        autograd): quantising every weight of a full-size network costs a sizeable part of a step."""
        out = {}
        with torch.no_grad():
            for name, (layer, q) in quantized_layers(pl_module).items():
                by_rule = dead_channels(q)
                dead = torch.zeros_like(by_rule)
                idx = by_rule.nonzero().squeeze(1)
                if idx.numel():
                    chain = layer.parametrizations.weight
                    rows = (quantize(chain.original[idx], q.bits[idx], q.exponent[idx]) if len(chain) == 1
                            else layer.weight[idx])  # another parametrization too: the full weight
                    dead[idx] = (rows.flatten(1) == 0).all(1)
                out[name] = dead.cpu()
        return out

    def _ensure_graph(self, pl_module: LightningModule) -> bool:
        if self.graph is not None:
            return True
        example = self._example
        if example is None and pl_module.example_input_array is not None:
            example = pl_module.example_input_array
            example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        if example is None:
            self._warn("channel removal needs one call of the LightningModule's forward (or "
                       "`example_input_array`) to trace the network; no removal yet")
            return False
        try:
            self.graph = ChannelGraph(pl_module, *example)
        except ValueError as exc:
            self._warn(f"channel removal disabled: {exc}")
            self.interval = 1 << 62
            return False
        for reason in self.graph.unsupported:
            if reason != "network output":
                self._warn(f"channel removal keeps the channels involved in: {reason}")
        self.remover = ChannelRemover(self.graph, self.kept)
        return True

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn("SelfCompression: " + message)

    # --- report / state ------------------------------------------------------------------------
    def channel_report(self, pl_module: nn.Module) -> list[dict[str, Any]]:
        """Per conv/linear layer: output channels at the start of training and now."""
        mods = dict(pl_module.named_modules())
        return [{"layer": n, "channels_before": c, "channels_after": output_size(mods[n])}
                for n, c in self.original.items() if n in mods]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": {n: {k: v.clone() for k, v in e.items()} for n, e in self.kept.items()},
            "original": dict(self.original),
            "events": [list(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = {n: dict(e) for n, e in state.get("kept", {}).items()}
        self.original = dict(state.get("original", self.original))
        self.events = [tuple(e) for e in state.get("events", [])]
        self.graph = self.remover = None


def _drop_ddp(trainer: Trainer) -> nn.Module:
    """Release the DDP wrapper (its reducer holds the parameters and their gradient
    accumulators) so the surgery can give the parameters fresh autograd state; the caller wraps
    the returned module again, with gradient buckets sized for the new shapes."""
    strategy = trainer.strategy
    inner = strategy.model.module
    strategy.model = None
    gc.collect()
    return inner


def load_compressed(module_cls: type[LightningModule], checkpoint_path: str, **kwargs: Any) -> LightningModule:
    """``module_cls.load_from_checkpoint(checkpoint_path, **kwargs)`` for a checkpoint written by
    :class:`SelfCompression` (quantisers, and fewer channels after removal).

    The plain ``MyModule.load_from_checkpoint`` cannot work: it builds the model with the user's
    ``__init__`` (float weights, full width) and Lightning offers no hook outside the user's own
    class between construction and ``load_state_dict``. This helper adds exactly that step
    (attach the quantisers the checkpoint holds and shrink each layer to the saved shapes,
    :func:`~pl_optim.compression.surgery.match_shapes`) in a throw-away subclass, and returns an
    instance of ``module_cls`` with the trained network.

    Example::

        model = load_compressed(MyModule, "epoch=9.ckpt")
    """

    class _Loader(module_cls):  # type: ignore[misc, valid-type]
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            super().on_load_checkpoint(checkpoint)
            match_shapes(self, checkpoint["state_dict"])

    model = _Loader.load_from_checkpoint(checkpoint_path, **kwargs)
    model.__class__ = module_cls
    return model
