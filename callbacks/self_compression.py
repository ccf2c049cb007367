"""SelfCompression: learn a bit depth per output channel and pay ``gamma * Q / N`` for the size."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from pl_optim.callbacks._base import (
    StepHookCallback,
    check_plot_path,
    refuse_sharded_strategy,
    resolve_plot_path,
)
from pl_optim.callbacks._channel_removal import RemovalDriver
from pl_optim.callbacks._schedule_length import derive_total_steps
from pl_optim.checks import boolean, fraction, integer, non_negative, optimizer_in_range, positive
from pl_optim.compression.checkpoint import (
    compressed_state,
    plain_state_dict,
    restore_compressed,
    to_parametrized,
)
from pl_optim.compression.quantizer import (
    attach_quantizers,
    check_init_bits,
    clean_gradients,
    place_quantizers,
    quantized_layers,
    quantizer_parameters,
    repair_nonfinite,
    round_bits,
    snapshot,
)
from pl_optim.compression.report import compression_stats, layer_sizes, plot_series, size_table
from pl_optim.compression.size import FLOAT_BITS, OutputPositions, add_size_grad, compute_size_loss
from pl_optim.compression.surgery import check_optimizer_state_sliceable, match_shapes
from pl_optim.report import Table

#: Defaults chosen from the measured recipes (docs/self_compression.md, "Defaults and why").
BITS_LR, EXPONENT_LR, FREEZE_AT = 0.05, 0.01, 0.75


class SelfCompression(StepHookCallback):
    """Self-compressing networks (Cséfalvay & Imber): every output channel of every conv/linear layer
    gets a learnable bit depth ``b`` and exponent ``e`` (:mod:`pl_optim.compression`); training minimises
    ``L_0 + gamma * Q / N`` (+ ``compute_gamma * C``) without touching ``training_step``, and dead
    channels are removed during training. This class only decides *when*; the maths is the pure-torch
    core (``attach_quantizers``, ``add_size_grad``, ``quantizer_param_groups``, ``ChannelRemoval``,
    ``plain_state_dict``), usable from a raw loop with the same result.

    * ``setup``: quantisers attached (before ``configure_optimizers``, so ``self.parameters()`` there holds
      ``bits``/``exponent``).
    * ``on_fit_start``: ``bits`` at ``lr`` and ``exponent`` at ``exponent_lr`` get param groups of their own
      in optimizer ``optimizers`` (``weight_decay=0``), unless ``configure_optimizers`` already placed them
      in groups of their own and neither lr was given. A scheduler built in ``configure_optimizers`` does
      not drive a group added here (its lr stays constant).
    * every optimizer step that ran (step ledger): non-finite ``bits``/``exponent`` gradients zeroed, the
      size gradient added to ``bits.grad`` (unscaled, once per step: exact under accumulation and AMP);
      after the step non-finite values / optimizer moments repaired (one warning), bits held fixed from
      ``freeze_at``, dead channels removed every ``removal_interval`` steps.
    * checkpoints: ``state_dict`` is the plain full-size model (quantised weights, removed channels as
      zeros) that ``MyModule.load_from_checkpoint`` loads strictly with the same outputs; the latent
      weights, bits and kept channels are this callback's state, so ``fit(ckpt_path=...)`` resumes exactly.
    * logs per epoch ``self_compression/bits_pct``, ``weights_pct``, ``Q``, ``mean_bits/<layer>``,
      ``bit_macs_pct``; one line per epoch with removals; at fit end the per-layer table (:attr:`report`, a
      :class:`~pl_optim.report.Table`: ``print`` it, ``to_dicts()``, ``to_pandas()``) and a PNG of size vs.
      epoch.

    Args:
        gamma: weight of the size loss, ``>= 0`` (larger: smaller, less accurate networks; 0.25-0.3 keeps
            ~2.5-3% of the float bits on the measured nets).
        init_bits: initial bit depth of every channel, ``> 0``.
        exclude: qualified names (in ``pl_module.named_modules()``) of layers to keep in float.
        lr: learning rate of ``bits`` (default 0.05: ~0.05 bit per Adam step, 8 -> ~2 bits in a few hundred
            steps; 0.5 collapsed accuracy, the optimizer's 1e-3 takes ~8,000 steps).
        exponent_lr: learning rate of ``exponent`` (default 0.01: ``e`` gets noisy straight-through
            gradients and Adam moves it by ~lr a step; sharing 0.05 cost ~1 pp).
        optimizers: index of the optimizer that receives the groups.
        plot_path: the PNG's path (relative paths go under ``default_root_dir``); None:
            ``<default_root_dir>/self_compression_size.png``; False: no plot.
        remove_channels: remove dead channels during training (default True: the size then counts live
            inputs only, the network and its step time shrink; ``docs/channel_removal.md``).
        removal_interval: decide about removal every this many optimizer steps.
        shift_decay: L1 proximal step per decision on the bias / BatchNorm shift of dead channels.
        freeze_at: fraction in (0, 1) of the training's optimizer steps after which ``bits``/``exponent`` are
            held fixed so the weights fine-tune on the final quantisation (default 0.75, measured to keep
            accuracy; not applied, with a warning, when the run length is unbounded); None: train them to the end.
        compute_gamma: weight, ``>= 0``, of the compute-weighted size term ``C = sum_l P_l Q_l / sum_l P_l N_l``
            (``P_l``: output positions, read on the first training batch); 0: off.
        gamma_warmup: fraction in (0, 1) of the training's optimizer steps over which ``gamma`` and
            ``compute_gamma`` ramp linearly from 0 to their value (the weights learn before the bits are
            pressed); must be below ``freeze_at``; needs a finite training length. None (default): no ramp.
        column_cost: weight, ``>= 0``, of the column cost (:mod:`pl_optim.compression.size`): each channel
            also pays for the input columns it holds in its consumers, at ``gamma`` and ``compute_gamma``'s
            rates times this (the network is traced for removal before the first size gradient). Needs
            ``remove_channels``. Default 0: off.
        integer_bits: at ``freeze_at``, round the bit depths to integers (:func:`~pl_optim.compression.round_bits`;
            channels under half a bit die and are removed) so the weights fine-tune on, and the size counts,
            the bit depths the packed file stores. Needs ``freeze_at``. Default False.

    Raises:
        ValueError: a bad argument (at construction); at setup, an ``exclude`` name matching no conv/linear
            layer or a model without one; at fit start, ``optimizers`` out of range.

    Example::

        trainer = Trainer(max_epochs=40, callbacks=[SelfCompression(gamma=0.25)])
        trainer.fit(model, datamodule=dm)
        small = pl_optim.compression.export_compressed(model.net)
    """

    def __init__(
        self,
        gamma: float,
        init_bits: float = 8.0,
        exclude: Iterable[str] = (),
        lr: float | None = None,
        exponent_lr: float | None = None,
        optimizers: int = 0,
        plot_path: str | Path | bool | None = None,
        remove_channels: bool = True,
        removal_interval: int = 1,
        shift_decay: float = 1e-3,
        freeze_at: float | None = FREEZE_AT,
        compute_gamma: float = 0.0,
        gamma_warmup: float | None = None,
        integer_bits: bool = False,
        column_cost: float = 0.0,
    ) -> None:
        self.gamma = float(non_negative("gamma", gamma))
        self.compute_gamma = float(non_negative("compute_gamma", compute_gamma))
        self.init_bits = check_init_bits(init_bits)
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        if not all(isinstance(x, str) for x in self.exclude):
            raise ValueError(f"`exclude` must be layer names (strings), got {self.exclude!r}")
        self.lr = positive("lr", lr, allow_none=True)
        self.exponent_lr = positive("exponent_lr", exponent_lr, allow_none=True)
        self.freeze_at = fraction("freeze_at", freeze_at, allow_none=True)
        self._freeze_step: float = math.inf
        self.gamma_warmup = fraction("gamma_warmup", gamma_warmup, allow_none=True)
        if self.gamma_warmup is not None and self.freeze_at is not None and self.gamma_warmup >= self.freeze_at:
            raise ValueError(f"`gamma_warmup` ({self.gamma_warmup!r}) must be below `freeze_at` ({self.freeze_at!r}): "
                             "the bits would be frozen before the size term is at full weight")
        self._warmup_steps = 0
        self.integer_bits = boolean("integer_bits", integer_bits)
        if self.integer_bits and self.freeze_at is None:
            raise ValueError("`integer_bits` (True) rounds the bit depths when they are frozen: it needs `freeze_at` "
                             "(a fraction in (0, 1)), got None")
        self.optimizers = integer("optimizers", optimizers, minimum=0)
        self.plot_path = check_plot_path(plot_path)
        self.history: list[dict[str, float]] = []
        self.report: Table = Table([])
        self.channels: list[dict[str, Any]] = []
        self.repaired = 0
        self._groups: list[tuple[dict, float]] = []
        self._saved: list[torch.Tensor] = []
        self._frozen = False
        self._module: LightningModule | None = None
        self._load_hook = None
        self._recorder: OutputPositions | None = None
        self.plot: Path | None = None
        removal = RemovalDriver(removal_interval, shift_decay)
        self.removal: RemovalDriver | None = removal if boolean("remove_channels", remove_channels) else None
        self.column_cost = float(non_negative("column_cost", column_cost))
        if self.column_cost and self.removal is None:
            raise ValueError(f"`column_cost` ({self.column_cost!r}) charges channels for the consumer columns that "
                             "removing them frees: it needs `remove_channels=True`, got remove_channels=False")

    @property
    def positions(self) -> dict[str, int]:
        """Layer -> output positions per sample, read on the first training batch (``compute_gamma``)."""
        return self._recorder.positions if self._recorder is not None else {}

    # --- attach ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "SelfCompression")
        attach_quantizers(pl_module, exclude=self.exclude, init_bits=self.init_bits)
        self._module = pl_module
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._adapt_loaded)
        if self.removal is not None:
            self.removal.setup(pl_module, stage)

    @staticmethod
    def _adapt_loaded(module, state_dict, prefix, *args) -> None:
        """Checkpoints hold the plain full-size model (quantised layout in earlier versions): convert."""
        if any("parametrizations.weight." in k for k in state_dict):
            match_shapes(module, state_dict, prefix)  # earlier format: quantised layout, shrunk shapes
        else:
            to_parametrized(module, state_dict, prefix)  # raises clearly for an already-shrunk model

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._recorder is not None:
            self._recorder.remove()
        super().teardown(trainer, pl_module, stage)
        if self.removal is not None:
            self.removal.teardown()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.removal is not None:
            self.removal.on_before_backward(loss)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._groups = self._place_parameters(trainer, pl_module)
        if self.removal is not None:  # an optimizer state the surgery cannot slice: refused now, not mid-training
            check_optimizer_state_sliceable(trainer.optimizers)

    def _place_parameters(self, trainer: Trainer, pl_module: LightningModule) -> list[tuple[dict, float]]:
        index = optimizer_in_range("optimizers", self.optimizers, len(trainer.optimizers))
        return place_quantizers(trainer.optimizers, pl_module, index, self.lr, self.exponent_lr, BITS_LR, EXPONENT_LR)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        total: int | None = None
        if self.freeze_at is not None or self.gamma_warmup is not None:
            try:
                total = derive_total_steps(trainer, len(trainer.optimizers))
            except ValueError as err:
                if self.gamma_warmup is not None:  # asked for explicitly: an error, not a warning
                    raise ValueError(f"SelfCompression: `gamma_warmup` ({self.gamma_warmup!r}) needs a finite "
                                     f"training length: {err}") from None
                # the default `freeze_at` must not break unbounded runs: warn, don't freeze
                rank_zero_warn(f"SelfCompression: `freeze_at` needs a finite training length ({err}); "
                               "the bits are not frozen in this run")
        self._freeze_step = math.inf if total is None or self.freeze_at is None else math.ceil(self.freeze_at * total)
        self._warmup_steps = 0 if total is None or self.gamma_warmup is None else max(1, math.ceil(self.gamma_warmup * total))
        for group, lr in self._groups:
            group["lr"] = lr  # the configured lr wins over a restored optimizer state
        if self._recorder is not None:
            self._recorder.remove()
        self._recorder = OutputPositions(pl_module)  # the next forward (the first batch; after a resume, again)

    def ramp(self, position: int) -> float:
        """The size terms' weight factor at optimizer step ``position`` (0-based): ``(position + 1) / W``
        during the ``gamma_warmup`` steps ``W``, then 1."""
        return min(1.0, (position + 1) / self._warmup_steps) if self._warmup_steps else 1.0

    # --- every optimizer step ----------------------------------------------------------------------
    def before_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        # The ledger calls this once the step's gradients exist (unscaled under GradScaler) and only
        # for steps that update something: the size gradient is added exactly once per real step.
        pl_module = trainer.lightning_module
        frozen = self.position(index) >= self._freeze_step
        if frozen and not self._frozen and self.integer_bits:
            round_bits(pl_module)  # once, as the bits freeze (after a resume: already integers, a no-op)
        self._frozen = frozen
        self._saved = snapshot(pl_module)
        self._repair_count(clean_gradients(pl_module), trainer)
        if self._recorder is not None and self._recorder.active and self._recorder.positions:
            self._recorder.remove()
            if self.compute_gamma and self._recorder.missing:
                rank_zero_warn(f"SelfCompression: layer(s) {self._recorder.missing} did not run in the first "
                               "forward; `compute_gamma` does not press on them")
        bits = {id(p) for p in quantizer_parameters(pl_module)}
        if self._frozen or not any(id(p) in bits for g in optimizer.param_groups for p in g["params"]):
            return
        ramp = self.ramp(self.position(index))
        # traced before the first size gradient (also the first after a resume): the column cost needs the graph
        graph = self.removal.core.graph if self.column_cost and self.removal.ensure_traced(pl_module) else None
        if not add_size_grad(pl_module, ramp * self.gamma, ramp * self.compute_gamma, self.positions, graph,
                             self.column_cost):
            rank_zero_warn("SelfCompression: non-finite bits; the size gradient was skipped this step")

    def after_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        pl_module = trainer.lightning_module
        if self._frozen:  # hold bits/exponents at their values from the freeze step on
            with torch.no_grad():
                for p, old in zip(quantizer_parameters(pl_module), self._saved):
                    p.copy_(old)
        self._repair_count(repair_nonfinite(pl_module, self._saved, trainer.optimizers), trainer)
        if self.removal is not None and index == len(trainer.optimizers) - 1:
            self.removal.after_step(trainer, self.position(index))

    def _repair_count(self, n: int, trainer: Trainer) -> None:
        if n and not self.repaired:
            rank_zero_warn(f"SelfCompression: {n} non-finite bits/exponent value(s), gradient(s) or optimizer "
                           f"moment(s) at optimizer step {trainer.global_step} were repaired (values kept, moments "
                           "and gradients zeroed); training goes on, later repairs are counted in `repaired`")
        self.repaired += n

    # --- logging and report ------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stats = compression_stats(pl_module)
        stats.pop("N")
        if self.positions:
            with torch.no_grad():
                stats["bit_macs_pct"] = 100.0 / FLOAT_BITS * float(compute_size_loss(pl_module, 1.0, self.positions))
        pl_module.log_dict({f"self_compression/{k}": float(v) for k, v in stats.items()}, on_epoch=True)
        self.history.append(
            {"epoch": float(trainer.current_epoch), **{k: float(stats[k]) for k in ("Q", "bits_pct", "weights_pct")}}
        )
        if self.removal is not None:
            self.removal.epoch_summary(trainer.current_epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = layer_sizes(pl_module)
        self.report = size_table(rows, title="SelfCompression report:")
        rank_zero_info(str(self.report))
        if self.removal is not None:
            self.channels = self.removal.channel_report()
            rank_zero_info("SelfCompression channels (before -> after): " + ", ".join(
                f"{c['layer']} {c['channels_before']} -> {c['channels_after']}"
                + (f" ({c['dead_kept']} dead kept)" if c["dead_kept"] else "") for c in self.channels))
            if any(c["dead_kept"] for c in self.channels):
                rank_zero_info("SelfCompression: dead channels stay while another producer of a residual sum still "
                               "writes them, while only part of their conv group died, while their bias / BatchNorm "
                               "shift is not yet 0, or when a warned pattern keeps them (docs/channel_removal.md)")
        path = resolve_plot_path(self.plot_path, trainer, "self_compression_size.png")
        if path is not None and self.history and trainer.is_global_zero:
            epochs = [h["epoch"] for h in self.history]
            series = {"% float bits": [h["bits_pct"] for h in self.history], "% weights": [h["weights_pct"] for h in self.history]}
            self.plot = plot_series(path, epochs, series, "epoch", "% kept", "SelfCompression: size vs. epoch")

    # --- checkpoints ---------------------------------------------------------------------------------
    def _kept(self) -> tuple[dict, dict | None]:
        core = self.removal.core if self.removal is not None else None
        return (core.kept, core.full) if core is not None else ({}, None)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        kept, full = self._kept()
        checkpoint["state_dict"] = plain_state_dict(pl_module, kept, full)  # what MyModule loads, strictly

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": [dict(h) for h in self.history], "steps": self.step_positions()}
        if self._module is not None and quantized_layers(self._module):
            state["compressed"] = compressed_state(self._module, self._kept()[0])
        if self.removal is not None:
            state["channel_removal"] = self.removal.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        if "steps" in state_dict:
            self.load_step_positions(state_dict["steps"])
        if self.removal is not None and "channel_removal" in state_dict:
            self.removal.load_state_dict(state_dict["channel_removal"])
        if self._module is not None and "compressed" in state_dict:  # after Lightning loaded the plain model
            restore_compressed(self._module, state_dict["compressed"])
