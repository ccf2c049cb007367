"""SelfCompression through a real Trainer: size gradient == loss term (accumulation, AMP), param
groups, NaN repair, logging/report, bad input."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from examples.tiny import RandomClassificationData, TinyConvNet
from pl_optim.callbacks import SelfCompression
from pl_optim.compression import add_size_grad, quantized_layers, quantizer_parameters, size_loss
from pl_optim.compression.size import compute_size_loss, kernel_area, live_input_columns, output_positions
from tests.helpers import InjectInfGrad, fp16_cpu_plugin

GAMMA = 50.0


class LossTermConvNet(TinyConvNet):
    """Adds ``gamma * Q / N`` (and ``compute_gamma * C``, positions read in this very forward) to the
    loss itself: the reference for the callback's gradient."""

    def __init__(self, size_gamma: float = 0.0, compute_gamma: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size_gamma, self.compute_gamma = size_gamma, compute_gamma

    def training_step(self, batch, batch_idx):
        positions = {}

        def record(module, args, output, name):
            positions.setdefault(name, output_positions(module, output))  # returns None: output unchanged

        hooks = [layer.register_forward_hook(lambda m, a, y, n=n: record(m, a, y, n))
                 for n, (layer, _) in quantized_layers(self).items()]
        try:
            loss = super().training_step(batch, batch_idx)
        finally:
            for h in hooks:
                h.remove()
        if self.size_gamma:
            loss = loss + size_loss(self, self.size_gamma)
        if self.compute_gamma:
            loss = loss + compute_size_loss(self, self.compute_gamma, positions)
        return loss


class BitsOnlyOptimizer(TinyConvNet):
    """configure_optimizers leaves the quantiser parameters out."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if "original" in n or "bn" in n], lr=0.05)


class Record(Callback):
    """Concatenated bits/exponents (and the first conv's weight) after every training batch."""

    def __init__(self):
        self.bits, self.weights = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.bits.append(torch.cat([p.detach().clone() for p in quantizer_parameters(pl_module)]))
        self.weights.append(pl_module.net[0][0].parametrizations.weight.original.detach().clone())


def _data():
    return RandomClassificationData(n=64, shape=(1, 8, 8), batch_size=8)


def _fit(trainer_kwargs, model, callback, **kw):
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback, *kw.pop("callbacks", [])], **{**trainer_kwargs, **kw})
    trainer.fit(model, datamodule=_data())
    return trainer


@pytest.mark.parametrize("term", ["size", "compute"])
@pytest.mark.parametrize("accumulate,amp", [(1, False), (3, False), (2, True)], ids=["plain", "accumulate3", "fp16+accumulate2"])
def test_size_gradient_equals_adding_the_loss_term(trainer_kwargs, accumulate, amp, term):
    extra = dict(accumulate_grad_batches=accumulate, limit_train_batches=6)
    if amp:
        extra["plugins"] = [fp16_cpu_plugin()]
    finals = []
    for cb_gamma, loss_gamma in [(GAMMA, 0.0), (0.0, GAMMA), (0.0, 0.0)]:
        pl.seed_everything(0)
        if term == "size":
            model = LossTermConvNet(size_gamma=loss_gamma, optimizer="sgd", lr=0.1, momentum=0.9)
            callback = SelfCompression(cb_gamma, init_bits=4)
        else:
            model = LossTermConvNet(compute_gamma=loss_gamma, optimizer="sgd", lr=0.1, momentum=0.9)
            callback = SelfCompression(0.0, init_bits=4, compute_gamma=cb_gamma)
        _fit(trainer_kwargs, model, callback, **dict(extra))
        finals.append([p.detach().clone() for p in model.parameters()])
    callback, reference, no_size = finals
    for a, b in zip(callback, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(callback, no_size))  # gamma had an effect


def test_default_groups_for_bits_and_exponents(trainer_kwargs):
    """``SGD(self.parameters())`` holds bits/exponents among the weights: by default they move into groups
    of their own at lr 0.05 / 0.01 without weight decay (the optimizer's lr would barely move them)."""
    model = TinyConvNet(optimizer="sgd", lr=0.1, weight_decay=0.01)
    trainer = _fit(trainer_kwargs, model, SelfCompression(1.0), limit_train_batches=2)
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [0.1, 0.05, 0.01] and [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.0]
    layers = quantized_layers(model).values()
    assert [id(p) for p in groups[1]["params"]] == [id(q.bits) for _, q in layers]
    assert [id(p) for p in groups[2]["params"]] == [id(q.exponent) for _, q in layers]
    ids = {id(p) for p in groups[0]["params"]}
    assert id(model.net[0][0].parametrizations.weight.original) in ids  # the layer's Parameter object itself
    assert not ids & {id(p) for p in quantizer_parameters(model)}


class OwnGroups(TinyConvNet):
    """configure_optimizers puts the quantiser parameters into a group of their own (a deliberate choice)."""

    def configure_optimizers(self):
        quant = quantizer_parameters(self)
        ids = {id(p) for p in quant}
        return torch.optim.SGD([{"params": [p for p in self.parameters() if id(p) not in ids]},
                                {"params": quant, "lr": 0.3}], lr=0.1)


def test_groups_of_their_own_from_configure_optimizers_are_kept(trainer_kwargs):
    trainer = _fit(trainer_kwargs, OwnGroups(), SelfCompression(1.0), limit_train_batches=2)
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [0.1, 0.3]


def test_own_group_with_lr_moves_them_out(trainer_kwargs):
    model = TinyConvNet(optimizer="adamw", lr=1e-3, weight_decay=0.1)
    trainer = _fit(trainer_kwargs, model, SelfCompression(1.0, lr=0.25), limit_train_batches=2)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 3 and groups[1]["lr"] == 0.25 and groups[1]["weight_decay"] == 0.0
    quant = {id(p) for p in quantizer_parameters(model)}
    assert {id(p) for g in groups[1:] for p in g["params"]} == quant and not quant & {id(p) for p in groups[0]["params"]}


def test_exponent_lr_gets_its_own_group(trainer_kwargs):
    model = TinyConvNet(optimizer="adam", lr=1e-3)
    trainer = _fit(trainer_kwargs, model, SelfCompression(1.0, lr=0.25, exponent_lr=0.002), limit_train_batches=2)
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.25, 0.002]
    layers = quantized_layers(model).values()
    assert {id(p) for p in groups[1]["params"]} == {id(q.bits) for _, q in layers}
    assert {id(p) for p in groups[2]["params"]} == {id(q.exponent) for _, q in layers}


def test_group_added_when_configure_optimizers_left_them_out(trainer_kwargs):
    model = BitsOnlyOptimizer()
    bits_before = [p.detach().clone() for p in quantizer_parameters(model)] if quantized_layers(model) else None
    assert bits_before is None
    cb = SelfCompression(20.0, init_bits=3)
    trainer = _fit(trainer_kwargs, model, cb, limit_train_batches=4)
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [0.05, 0.05, 0.01]
    bits = quantized_layers(model)["net.0.0"][1].bits
    assert (bits < 3.0).all()  # trained by the size gradient


def test_amp_skipped_steps_leave_bits_untouched(trainer_kwargs):
    rec = Record()
    model = TinyConvNet(optimizer="sgd", lr=0.1)
    _fit(trainer_kwargs, model, SelfCompression(GAMMA), limit_train_batches=5, plugins=[fp16_cpu_plugin()],
         callbacks=[InjectInfGrad({2}), rec])
    assert torch.equal(rec.bits[1], rec.bits[2])  # step 2 skipped: no size gradient applied
    assert not torch.equal(rec.bits[2], rec.bits[3])
    assert all(torch.isfinite(b).all() for b in rec.bits)


def test_freeze_at_holds_bits_and_equals_zero_lr_for_them(trainer_kwargs):
    class ZeroQuantLr(Callback):  # reference: the quantiser group's lr drops to 0 from step 4 on
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 4:
                for group in trainer.optimizers[0].param_groups[1:]:
                    group["lr"] = 0.0

    runs = []
    for freeze_at, extra in [(0.5, []), (None, [ZeroQuantLr()])]:
        pl.seed_everything(0)
        model, rec = TinyConvNet(optimizer="sgd", lr=0.1, momentum=0.9), Record()
        _fit(trainer_kwargs, model, SelfCompression(GAMMA, lr=0.05, freeze_at=freeze_at), limit_train_batches=8,
             callbacks=[rec, *extra])
        runs.append((model, rec))
    (frozen, rec), (reference, _) = runs
    assert len(rec.bits) == 8 and not torch.equal(rec.bits[2], rec.bits[3])  # 4 steps of 8 trained the bits
    assert all(torch.equal(rec.bits[3], b) for b in rec.bits[4:])  # then they are held
    assert not torch.equal(rec.weights[3], rec.weights[7])  # while the weights keep training
    for a, b in zip(frozen.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_integer_bits_rounds_at_the_freeze_then_holds_them(trainer_kwargs):
    pl.seed_everything(0)
    model, rec = TinyConvNet(optimizer="sgd", lr=0.1, momentum=0.9), Record()
    cb = SelfCompression(GAMMA, init_bits=2.3, lr=0.05, freeze_at=0.5, integer_bits=True, remove_channels=False)
    _fit(trainer_kwargs, model, cb, limit_train_batches=8, callbacks=[rec])
    n = sum(p.numel() for p in quantizer_parameters(model)) // 2
    bits = [torch.cat([b[i:i + c] for i, c in _bit_slices(model)]) for b in rec.bits]
    assert all(not torch.equal(b, b.round()) for b in bits[:4])  # trained, real-valued bits before the freeze
    assert torch.equal(bits[4], bits[3].clamp_min(0).round())  # rounded at the freeze (step 4 of 8)
    assert all(torch.equal(bits[4], b) for b in bits[5:]) and bits[4].numel() == n  # then held
    assert not torch.equal(rec.weights[4], rec.weights[7])  # while the weights keep training


def _bit_slices(model):
    """(offset, length) of each ``bits`` tensor in :class:`Record`'s concatenation (bits, exponent, ...)."""
    out, offset = [], 0
    for _, q in quantized_layers(model).values():
        out.append((offset, q.bits.numel()))
        offset += q.bits.numel() + q.exponent.numel()
    return out


class Poison(Callback):
    """NaN into a bits gradient and inf into an exponent gradient at step 2; NaN into the bits' Adam
    moment (optimizer state) at step 4."""

    def __init__(self):
        self.calls = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls += 1
        q = quantized_layers(pl_module)["net.1.0"][1]
        if self.calls == 2:
            q.bits.grad[0] = float("nan")
            q.exponent.grad[1] = float("inf")
        if self.calls == 4:
            optimizer.state[q.bits]["exp_avg_sq"][2] = float("nan")


def test_nonfinite_gradients_and_moments_are_repaired_once_and_training_goes_on(trainer_kwargs):
    model = TinyConvNet(optimizer="adam", lr=0.01)
    cb = SelfCompression(GAMMA, init_bits=2, lr=0.2, shift_decay=0.05, freeze_at=None)
    with pytest.warns(UserWarning, match=r"non-finite bits/exponent value\(s\), gradient\(s\) or optimizer moment") as rec:
        trainer = pl.Trainer(max_epochs=3, limit_train_batches=8, callbacks=[cb, Poison()], **trainer_kwargs)
        trainer.fit(model, datamodule=_data())
    assert len([w for w in rec if "non-finite" in str(w.message)]) == 1  # one warning
    assert cb.repaired == 4  # step 2: 2 gradients; step 4: the NaN moment and the value it made NaN
    opt = trainer.optimizers[0]
    for p in quantizer_parameters(model):
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))
    assert (quantized_layers(model)["net.1.0"][1].bits[:3] < 1.5).all()  # the poisoned channels kept training
    assert cb.removal.core.events  # and channels were still removed after the faults


def test_logging_report_and_plot(trainer_kwargs, tmp_path, caplog):
    cb = SelfCompression(GAMMA, plot_path=tmp_path / "size.png")
    model = TinyConvNet()
    with caplog.at_level(logging.INFO):
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, callbacks=[cb], **trainer_kwargs)
        trainer.fit(model, datamodule=_data())
    keys = {"self_compression/bits_pct", "self_compression/weights_pct", "self_compression/Q",
            "self_compression/mean_bits/net.0.0", "self_compression/mean_bits/net.4"}
    assert keys <= set(trainer.callback_metrics)
    assert [h["epoch"] for h in cb.history] == [0.0, 1.0]
    assert cb.history[1]["bits_pct"] < cb.history[0]["bits_pct"] < 25.0  # 8 bits = 25 %, shrinking
    assert [r["name"] for r in cb.report] == ["net.0.0", "net.1.0", "net.4"]
    assert cb.report[0]["out_total"] == 8 and cb.report[0]["in_total"] == 1
    assert "SelfCompression report" in caplog.text and "net.1.0" in caplog.text
    assert (tmp_path / "size.png").stat().st_size > 1000 and cb.plot == tmp_path / "size.png"
    restored = SelfCompression(1.0)
    restored.load_state_dict(cb.state_dict())
    assert restored.history == cb.history


def test_resume_from_checkpoint_restores_quantisers(trainer_kwargs, tmp_path):
    """Without removal: 2 epochs straight == 1 epoch + resume on a fresh model (weights, bits,
    exponents and optimizer state bit-identical), not just the same step count."""
    kw = dict(limit_train_batches=3, remove_channels=False)

    def cb():
        return SelfCompression(GAMMA, remove_channels=kw["remove_channels"], freeze_at=None)

    pl.seed_everything(0)
    straight = TinyConvNet()
    t0 = pl.Trainer(max_epochs=2, limit_train_batches=3, callbacks=[cb()], **trainer_kwargs)
    t0.fit(straight, datamodule=_data())
    pl.seed_everything(0)
    model = TinyConvNet()
    trainer = _fit(trainer_kwargs, model, cb(), limit_train_batches=3)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = TinyConvNet()
    trainer2 = pl.Trainer(max_epochs=2, limit_train_batches=3, callbacks=[cb()], **trainer_kwargs)
    trainer2.fit(fresh, datamodule=_data(), ckpt_path=tmp_path / "last.ckpt")
    assert trainer2.global_step == t0.global_step == 6
    assert len(trainer2.optimizers[0].param_groups) == len(t0.optimizers[0].param_groups) == 3
    a, b = dict(straight.named_parameters()), dict(fresh.named_parameters())
    assert a.keys() == b.keys() and any(".bits" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for p, q in zip(t0.optimizers[0].state.values(), trainer2.optimizers[0].state.values()):
        assert all(torch.equal(p[k], q[k]) for k in p if torch.is_tensor(p[k]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=-1.0), r"`gamma` must be a finite number >= 0, got -1.0"),
        (dict(gamma=float("nan")), r"`gamma` must be a finite number >= 0, got nan"),
        (dict(gamma=float("inf")), r"`gamma` must be a finite number >= 0, got inf"),
        (dict(gamma=True), r"`gamma` must be a finite number >= 0, got True"),
        (dict(gamma=1.0, init_bits=0), r"`init_bits` must be a positive finite number, got 0"),
        (dict(gamma=1.0, init_bits=-2.5), r"`init_bits` must be a positive finite number, got -2.5"),
        (dict(gamma=1.0, lr=0.0), r"`lr` must be a positive finite number or None, got 0.0"),
        (dict(gamma=1.0, exponent_lr=float("nan")), r"`exponent_lr` must be a positive finite number or None, got nan"),
        (dict(gamma=1.0, optimizers=-1), r"`optimizers` must be an integer >= 0, got -1"),
        (dict(gamma=1.0, exclude=[3]), r"`exclude` must be layer names \(strings\), got \[3\]"),
        (dict(gamma=1.0, freeze_at=1.0), r"`freeze_at` must be in \(0, 1\) or None, got 1.0"),
        (dict(gamma=1.0, freeze_at=True), r"`freeze_at` must be in \(0, 1\) or None, got True"),
        (dict(gamma=1.0, compute_gamma=-0.5), r"`compute_gamma` must be a finite number >= 0, got -0.5"),
        (dict(gamma=1.0, compute_gamma=float("inf")), r"`compute_gamma`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfCompression(**kwargs)


class StopAfterOneBatch(Callback):
    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


def test_bad_exclude_and_model_at_setup(trainer_kwargs):
    with pytest.raises(ValueError, match=r"`exclude` name 'net.9' matches no"):
        _fit(trainer_kwargs, TinyConvNet(), SelfCompression(1.0, exclude=["net.9"]), limit_train_batches=1)

    class NoLayers(TinyConvNet):
        def build_net(self):
            return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.AdaptiveAvgPool1d(3))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match=r"has no Conv1d/Conv2d/Conv3d/Linear layer"):
        _fit(trainer_kwargs, NoLayers(), SelfCompression(1.0), limit_train_batches=1)
    with pytest.raises(ValueError, match=r"`optimizers` is 3 but the model configures 1 optimizer\(s\)"):
        _fit(trainer_kwargs, BitsOnlyOptimizer(), SelfCompression(1.0, optimizers=3), limit_train_batches=1)
    cb = SelfCompression(1.0, freeze_at=0.5)
    with pytest.warns(UserWarning, match=r"`freeze_at` needs a finite training length.*not frozen"):
        trainer = pl.Trainer(max_epochs=-1, callbacks=[cb, StopAfterOneBatch()], **trainer_kwargs)
        trainer.fit(TinyConvNet(), datamodule=_data())
    assert cb._freeze_step == float("inf")


def test_compute_gamma_reads_positions_once_and_presses_by_compute(trainer_kwargs):
    """P_l from the first training forward (8x8 convs: 64 positions, the head: 1), hooks then removed;
    bit_macs_pct logged; the gradient is P_l K I_alive / sum P N (a conv row 64x the head's per weight)."""
    model = TinyConvNet(optimizer="sgd", lr=1e-9)
    callback = SelfCompression(0.0, init_bits=4, compute_gamma=1.0)
    trainer = _fit(trainer_kwargs, model, callback, limit_train_batches=3)
    assert callback.positions == {"net.0.0": 64, "net.1.0": 64, "net.4": 1}
    assert not callback._recorder.active
    assert 0 < trainer.callback_metrics["self_compression/bit_macs_pct"] <= 100 * 4 / 32
    for _, q in quantized_layers(model).values():
        q.bits.grad = None
    assert add_size_grad(model, 0.0, 1.0, callback.positions)
    layers = quantized_layers(model)
    macs = sum(callback.positions[n] * int(q.float_numel) for n, (_, q) in layers.items())
    for n, (layer, q) in layers.items():  # dC/db_i = P_l K I_alive(i) / sum_l P_l N_l
        want = callback.positions[n] * kernel_area(layer) * live_input_columns(layer, q).float() / macs
        torch.testing.assert_close(q.bits.grad, want)


class SkipsSome(TinyConvNet):
    """training_step returns None (no update) on batches 2 and 3 of every epoch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx in (2, 3) else loss


def test_steps_without_update_change_neither_bits_nor_shifts_nor_counters(trainer_kwargs):
    class Shifts(Callback):
        def __init__(self):
            self.bits, self.shifts = [], []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.bits.append(torch.cat([p.detach().clone() for p in quantizer_parameters(pl_module)]))
            self.shifts.append(pl_module.net[1][1].bias.detach().clone())

    model, rec = SkipsSome(optimizer="sgd", lr=0.1), Shifts()
    cb = SelfCompression(GAMMA, init_bits=2, lr=0.2, shift_decay=0.05, freeze_at=None)
    pl.Trainer(max_epochs=2, limit_train_batches=6, callbacks=[cb, rec], **trainer_kwargs).fit(model, datamodule=_data())
    for epoch in (0, 6):  # batches 2 and 3 ran no update: the bits and the BatchNorm shifts stand still
        assert not torch.equal(rec.bits[epoch], rec.bits[epoch + 1])
        for i in (2, 3):
            assert torch.equal(rec.bits[epoch + i], rec.bits[epoch + 1])
            assert torch.equal(rec.shifts[epoch + i], rec.shifts[epoch + 1])
    assert cb.step_positions() == [8]  # 2 x 6 batches, 4 without an update
    assert all(step <= 8 for step, _, _ in cb.removal.core.events)


@pytest.mark.parametrize("decay_first", [True, False], ids=["decay-then-compression", "compression-then-decay"])
def test_every_callback_order_resumes_exactly(trainer_kwargs, tmp_path, decay_first):
    """DecoupledWeightDecay before or after a SelfCompression that adds param groups: resuming a
    checkpoint (after removals) gives the uninterrupted run's weights bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pl_optim.callbacks import DecoupledWeightDecay

    def callbacks():
        pair = [DecoupledWeightDecay(0.01, exclude_1d=False),
                SelfCompression(GAMMA, init_bits=2, lr=0.2, shift_decay=0.05, freeze_at=None)]
        return pair if decay_first else pair[::-1]

    kw = {**trainer_kwargs, "enable_checkpointing": True, "limit_val_batches": 0}
    runs = []
    for resume in (False, True):
        pl.seed_everything(0)
        model = TinyConvNet(optimizer="adam", lr=0.05)
        cbs = callbacks()
        if not resume:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        pl.Trainer(max_epochs=3, limit_train_batches=8, callbacks=cbs, **kw).fit(
            model, datamodule=_data(), ckpt_path=tmp_path / "epoch=1.ckpt" if resume else None)
        runs.append((model, cbs))
    (full, cbs), (resumed, _) = runs
    assert next(c for c in cbs if isinstance(c, SelfCompression)).removal.core.events
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


class RampedLossTerm(LossTermConvNet):
    """The reference for ``gamma_warmup``: the loss term's weights ramp as ``min(1, (step + 1) / W)``."""

    def __init__(self, warmup_steps: int, gammas: tuple[float, float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.warmup_steps, self.gammas = warmup_steps, gammas

    def training_step(self, batch, batch_idx):
        ramp = min(1.0, (self.trainer.global_step + 1) / self.warmup_steps)
        self.size_gamma, self.compute_gamma = (ramp * g for g in self.gammas)
        return super().training_step(batch, batch_idx)


def test_gamma_warmup_ramps_both_size_terms_like_the_loss_term(trainer_kwargs):
    """gamma_warmup=0.5 of 6 steps: W = 3, the size and compute terms weigh 1/3, 2/3, 1, 1, 1, 1 of their
    value; equal to adding the ramped terms to the loss, and different from no warm-up."""
    finals = []
    for callback, model in [
        (SelfCompression(GAMMA, init_bits=4, compute_gamma=5.0, gamma_warmup=0.5, freeze_at=None),
         TinyConvNet(optimizer="sgd", lr=0.1, momentum=0.9)),
        (SelfCompression(0.0, init_bits=4, freeze_at=None),
         RampedLossTerm(3, (GAMMA, 5.0), optimizer="sgd", lr=0.1, momentum=0.9)),
        (SelfCompression(GAMMA, init_bits=4, compute_gamma=5.0, freeze_at=None),
         TinyConvNet(optimizer="sgd", lr=0.1, momentum=0.9)),
    ]:
        pl.seed_everything(0)
        model.load_state_dict(TinyConvNet(optimizer="sgd").state_dict())  # the same start for all three
        _fit(trainer_kwargs, model, callback, limit_train_batches=6)
        finals.append([p.detach().clone() for p in model.parameters()])
        if callback.gamma_warmup is not None:
            assert callback._warmup_steps == 3 and [callback.ramp(k) for k in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    warm, reference, no_warmup = finals
    for a, b in zip(warm, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(warm, no_warmup))


def test_gamma_warmup_resumes_mid_ramp_exactly(trainer_kwargs, tmp_path):
    """A run of 8 steps with W = 6 checkpointed at step 4 (an epoch end) and resumed equals the uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def cb():
        return SelfCompression(GAMMA, gamma_warmup=0.75, freeze_at=None, remove_channels=False)

    kw = {**trainer_kwargs, "enable_checkpointing": True, "max_epochs": 2, "limit_train_batches": 4}
    pl.seed_everything(0)
    straight = TinyConvNet()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{step}")
    pl.Trainer(callbacks=[cb(), ckpt], **kw).fit(straight, datamodule=_data())
    fresh, resumed = TinyConvNet(), cb()
    pl.Trainer(callbacks=[resumed], **kw).fit(fresh, datamodule=_data(), ckpt_path=tmp_path / "step=4.ckpt")
    assert resumed._warmup_steps == 6 and resumed.position(0) == 8
    a, b = dict(straight.named_parameters()), dict(fresh.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gamma_warmup_needs_a_length_and_must_precede_the_freeze(trainer_kwargs):
    with pytest.raises(ValueError, match=r"`gamma_warmup` \(0.2\) needs a finite training length"):
        pl.Trainer(max_epochs=-1, callbacks=[SelfCompression(1.0, gamma_warmup=0.2)], **trainer_kwargs).fit(
            TinyConvNet(), datamodule=_data())
    with pytest.raises(ValueError, match=r"`gamma_warmup` \(0.8\) must be below `freeze_at` \(0.75\)"):
        SelfCompression(1.0, gamma_warmup=0.8)
    SelfCompression(1.0, gamma_warmup=0.8, freeze_at=None)  # no freeze: any ramp in (0, 1)
