"""SelfCompression: learn a bit depth per output channel and pay ``gamma * Q / N`` for the size."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from pl_optim.callbacks._base import StepHookCallback, refuse_sharded_strategy
from pl_optim.callbacks._channel_removal import ChannelRemoval
from pl_optim.callbacks._schedule_length import derive_total_steps
from pl_optim.checks import non_negative, positive
from pl_optim.compression.quantizer import (
    attach_quantizers,
    check_init_bits,
    quantized_layers,
    quantizer_parameters,
    repair_nonfinite,
    snapshot,
)
from pl_optim.compression.report import compression_stats, layer_sizes, plot_series, size_table
from pl_optim.compression.size import FLOAT_BITS, add_size_grad, compute_size_loss, output_positions
from pl_optim.report import Table


class SelfCompression(StepHookCallback):
    """Self-compressing networks (Cséfalvay & Imber): every output channel of every conv/linear
    layer gets a learnable bit depth ``b`` and exponent ``e`` (:mod:`pl_optim.compression`), and
    training minimises ``L_0 + gamma * Q / N`` without touching ``training_step``.

    The weights become ``q(w) = 2^e round(clamp(2^-e w, -2^(b-1), 2^(b-1) - 1))`` (straight-through
    round); ``Q = sum_layers K * sum_i relu(b_i) * I_alive`` is the size in bits and ``N`` the
    float weight count. Instead of adding ``gamma Q / N`` to the loss, ``d(gamma Q/N)/db`` is added
    to ``bits.grad`` in ``on_before_optimizer_step``: once per optimizer step, on unscaled
    gradients, so it is exact under gradient accumulation and AMP loss scaling (and before
    gradient clipping, as a loss term would be).

    Quantisers are attached in ``setup`` (before ``configure_optimizers``, so ``self.parameters()``
    there includes ``bits``/``exponent``). At ``on_fit_start``: if no optimizer holds them they
    become a new param group of optimizer ``optimizer_index`` (``lr`` or that optimizer's first
    group's lr, ``weight_decay=0``; exponents in a second group when ``exponent_lr`` is given); if
    the optimizer already holds them and ``lr`` or ``exponent_lr`` is given they are moved into
    such groups. A scheduler created in ``configure_optimizers`` does
    not drive a group added here (its lr stays constant).

    Logs each training epoch ``self_compression/bits_pct`` (% of float bits kept),
    ``weights_pct``, ``Q``, ``mean_bits/<layer>`` and ``bit_macs_pct`` (``100 C / 32``: % of the
    float network's bit-MACs); at fit end prints the per-layer table (``rank_zero_info``), keeps
    it in :attr:`report` (a :class:`~pl_optim.report.Table`: ``print`` it, ``to_dicts()``,
    ``to_pandas()``) and, with matplotlib, saves a PNG of size vs. epoch. A NaN/inf appearing in ``bits``/``exponent`` after a step is replaced by
    its previous value, with a warning.

    Args:
        gamma: weight of the size loss, ``>= 0`` (larger: smaller, less accurate networks).
        init_bits: initial bit depth of every channel, ``> 0``.
        exclude: qualified names (in ``pl_module.named_modules()``) of layers to keep in float.
        lr: learning rate of ``bits`` (and of ``exponent`` unless ``exponent_lr`` is given; None:
            see above).
        exponent_lr: learning rate of ``exponent`` in a group of its own (None: with ``bits``).
            With Adam a small one (about the weights' lr) keeps accuracy: ``e`` gets noisy
            straight-through gradients, and Adam moves it by ~lr per step whatever their size.
        optimizer_index: the optimizer that receives the new param group.
        plot_path: where to save the PNG (default ``<default_root_dir>/self_compression_size.png``);
            ``False`` disables it.
        remove_channels: remove dead channels during training (``docs/channel_removal.md``):
            the layers and the optimizer state shrink, checkpoints keep loading, DDP is rebuilt.
        removal_interval: decide about removal every this many optimizer steps.
        shift_decay: L1 proximal step per decision on the bias / BatchNorm shift of dead channels.
        freeze_at: fraction in (0, 1) of the training's optimizer steps (the length every pl_optim
            schedule uses, :func:`~pl_optim.callbacks._schedule_length.derive_total_steps`) after which ``bits``/``exponent`` are held fixed
            (put back after every optimizer step, no size gradient), so the weights fine-tune on the
            final quantisation; None: they train to the end.
        compute_gamma: weight, ``>= 0``, of the compute-weighted size term ``C = sum_l P_l Q_l /
            sum_l P_l N_l`` (:func:`~pl_optim.compression.size.compute_size_loss`; ``P_l``: output
            positions per sample, read from the layers' outputs on the first training batch) — the
            mean bit depth per float multiply-accumulate. It presses on the layers that hold the
            compute (early, high-resolution convs) where ``gamma`` presses on those that hold the
            weights; both may be used together. 0: off.

    Raises:
        ValueError: a bad argument (at construction); at setup, an ``exclude`` name matching no
            conv/linear layer or a model without one.

    Example::

        trainer = Trainer(callbacks=[SelfCompression(gamma=0.3, lr=0.05, exponent_lr=0.01)])
        model = DigitsConvNet()
        trainer.fit(model, datamodule=DigitsDataModule())
        small = pl_optim.compression.export_compressed(model.net)
    """

    def __init__(
        self,
        gamma: float,
        init_bits: float = 8.0,
        exclude: Iterable[str] = (),
        lr: float | None = None,
        exponent_lr: float | None = None,
        optimizer_index: int = 0,
        plot_path: str | Path | bool | None = None,
        remove_channels: bool = False,
        removal_interval: int = 1,
        shift_decay: float = 1e-3,
        freeze_at: float | None = None,
        compute_gamma: float = 0.0,
    ) -> None:
        gamma = non_negative("gamma", gamma)
        self.compute_gamma = float(non_negative("compute_gamma", compute_gamma))
        self.init_bits = check_init_bits(init_bits)
        if isinstance(exclude, str):
            exclude = [exclude]
        self.exclude = list(exclude)
        if not all(isinstance(x, str) for x in self.exclude):
            raise ValueError(f"`exclude` must be layer names (strings), got {self.exclude!r}")
        positive("lr", lr, allow_none=True)
        positive("exponent_lr", exponent_lr, allow_none=True)
        if freeze_at is not None and (
            isinstance(freeze_at, bool) or not isinstance(freeze_at, (int, float)) or not 0 < freeze_at < 1
        ):
            raise ValueError(f"`freeze_at` must be in (0, 1) or None, got {freeze_at!r}")
        self.freeze_at = freeze_at
        self._freeze_step: float = math.inf
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"`optimizer_index` must be an integer >= 0, got {optimizer_index!r}")
        self.gamma = float(gamma)
        self.lr = lr
        self.exponent_lr = exponent_lr
        self.optimizer_index = optimizer_index
        self.plot_path = plot_path
        self.history: list[dict[str, float]] = []
        self.report: Table = Table([])
        self._groups: list[tuple[dict, float | None]] = []
        self._saved: list[torch.Tensor] = []
        self._frozen = False
        self.plot: Path | None = None
        if not isinstance(remove_channels, bool):
            raise ValueError(f"`remove_channels` must be True or False, got {remove_channels!r}")
        removal = ChannelRemoval(removal_interval, shift_decay)
        self.removal: ChannelRemoval | None = removal if remove_channels else None
        self.channels: list[dict[str, Any]] = []
        self.positions: dict[str, int] = {}
        self._position_hooks: list = []

    # --- attach ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "SelfCompression")
        attach_quantizers(pl_module, exclude=self.exclude, init_bits=self.init_bits)
        if self.removal is not None:
            self.removal.setup(trainer, pl_module, stage)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_position_hooks()
        super().teardown(trainer, pl_module, stage)
        if self.removal is not None:
            self.removal.teardown()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.removal is not None:
            self.removal.on_before_backward(loss)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._groups = self._place_parameters(trainer, pl_module)

    def _place_parameters(self, trainer: Trainer, pl_module: LightningModule) -> list[tuple[dict, float | None]]:
        params = quantizer_parameters(pl_module)
        ids = {id(p) for p in params}
        holders = {i for i, opt in enumerate(trainer.optimizers) for g in opt.param_groups for p in g["params"] if id(p) in ids}
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]} & ids
        if held and held != ids or len(holders) > 1:
            raise RuntimeError(
                "configure_optimizers put only some of the quantiser parameters (bits/exponent) into optimizers; "
                "supported: all of them in one optimizer, or none (SelfCompression then adds them)"
            )
        if held and self.lr is None and self.exponent_lr is None:
            return []
        index = holders.pop() if held else self.optimizer_index
        if index >= len(trainer.optimizers):
            raise ValueError(f"`optimizer_index` {index} is out of range: the trainer has {len(trainer.optimizers)} optimizer(s)")
        opt = trainer.optimizers[index]
        if isinstance(opt, torch.optim.LBFGS):
            raise ValueError(
                "SelfCompression adds param groups for the bit depths/exponents, but LBFGS supports exactly one "
                "param group; put the quantiser parameters into the LBFGS group yourself (configure_optimizers: "
                "torch.optim.LBFGS(self.parameters())) and leave `lr`/`exponent_lr` at None, or use another optimizer"
            )
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        lr = self.lr if self.lr is not None else opt.param_groups[0]["lr"]
        split = [(params[0::2], lr, self.lr), (params[1::2], self.exponent_lr, self.exponent_lr)]
        groups = [(params, lr, self.lr)] if self.exponent_lr is None else split
        for group_params, group_lr, _ in groups:
            opt.add_param_group({"params": group_params, "lr": group_lr, "weight_decay": 0.0})
        return [(opt.param_groups[i - len(groups)], fixed) for i, (_, _, fixed) in enumerate(groups)]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.freeze_at is not None:
            try:
                total = derive_total_steps(trainer, len(trainer.optimizers))
            except ValueError as err:
                raise ValueError(f"`freeze_at` needs a finite training length: {err}") from None
            self._freeze_step = math.ceil(self.freeze_at * total)
        for group, lr in self._groups:
            if lr is not None:
                group["lr"] = lr  # the configured lr wins over a restored optimizer state
        self._record_positions(pl_module)

    def _record_positions(self, pl_module: LightningModule) -> None:
        """Forward hooks that read every quantised layer's output positions on the next forward
        (the first training batch; after a resume, again) and are removed at the first step."""
        self._remove_position_hooks()
        self.positions = {}

        def record(module, args, output, name) -> None:  # returns None: the output is unchanged
            if torch.is_tensor(output):
                self.positions.setdefault(name, output_positions(module, output))

        self._position_hooks = [
            layer.register_forward_hook(lambda m, a, y, n=name: record(m, a, y, n))
            for name, (layer, _) in quantized_layers(pl_module).items()
        ]

    def _remove_position_hooks(self) -> None:
        for h in self._position_hooks:
            h.remove()
        self._position_hooks = []

    # --- every optimizer step ----------------------------------------------------------------
    def before_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        # The ledger calls this once the step's gradients exist (unscaled under GradScaler) and only
        # for steps that update something: the size gradient is added exactly once per real step.
        pl_module = trainer.lightning_module
        self._frozen = self.position(index) >= self._freeze_step
        self._saved = snapshot(pl_module)
        if self._position_hooks and self.positions:
            self._remove_position_hooks()
            if self.compute_gamma:
                missing = sorted(set(quantized_layers(pl_module)) - set(self.positions))
                if missing:
                    rank_zero_warn(f"SelfCompression: layer(s) {missing} did not run in the first forward; "
                                   "`compute_gamma` does not press on them")
        bits = {id(p) for p in quantizer_parameters(pl_module)}
        if self._frozen or not any(id(p) in bits for g in optimizer.param_groups for p in g["params"]):
            return
        if not add_size_grad(pl_module, self.gamma, self.compute_gamma, self.positions):
            rank_zero_warn("SelfCompression: non-finite bits or gradient; the size gradient was skipped this step")

    def after_step(self, trainer: Trainer, index: int, optimizer: torch.optim.Optimizer) -> None:
        if self._frozen:  # hold bits/exponents at their values from the freeze step on
            with torch.no_grad():
                for p, old in zip(quantizer_parameters(trainer.lightning_module), self._saved):
                    p.copy_(old)
        repaired = repair_nonfinite(trainer.lightning_module, self._saved)
        if repaired:
            rank_zero_warn(
                f"SelfCompression: {repaired} bits/exponent value(s) became NaN/inf in optimizer step "
                f"{trainer.global_step}; kept their previous values"
            )
        if self.removal is not None and index == len(trainer.optimizers) - 1:
            self.removal.after_step(trainer, trainer.lightning_module, repaired, self.position(index))

    # --- logging and report ------------------------------------------------------------------
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

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = layer_sizes(pl_module)
        self.report = size_table(rows, title="SelfCompression report:")
        rank_zero_info(str(self.report))
        if self.removal is not None:
            self.channels = self.removal.channel_report(pl_module)
            rank_zero_info("SelfCompression channels (before -> after): " + ", ".join(
                f"{c['layer']} {c['channels_before']} -> {c['channels_after']}" for c in self.channels))
        if self.plot_path is not False and self.history and trainer.is_global_zero:
            path = self.plot_path or Path(trainer.default_root_dir) / "self_compression_size.png"
            epochs = [h["epoch"] for h in self.history]
            series = {"% float bits": [h["bits_pct"] for h in self.history], "% weights": [h["weights_pct"] for h in self.history]}
            self.plot = plot_series(path, epochs, series, "epoch", "% kept", "SelfCompression: size vs. epoch")

    def state_dict(self) -> dict[str, Any]:
        state = {"history": [dict(h) for h in self.history], "steps": self.step_positions()}
        if self.removal is not None:
            state["channel_removal"] = self.removal.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        if "steps" in state_dict:
            self.load_step_positions(state_dict["steps"])
        if self.removal is not None and "channel_removal" in state_dict:
            self.removal.load_state_dict(state_dict["channel_removal"])
