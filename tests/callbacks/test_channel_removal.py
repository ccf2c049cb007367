"""Channel removal inside SelfCompression through a real Trainer: function preservation at every
removal, same result as removing at the end, checkpoints, inference loading, bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn.utils import parametrize

from examples.tiny import RandomClassificationData, TinyConvNet
from pl_optim.callbacks import SelfCompression, load_compressed
from pl_optim.callbacks._channel_removal import ChannelRemoval
from pl_optim.compression import attach_quantizers, quantized_layers
from pl_optim.compression.quantizer import dead_channels
from pl_optim.compression.surgery import ChannelRemover

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _data():
    return RandomClassificationData(n=64, shape=(1, 8, 8), batch_size=8)


def _shrinking(**kw):
    return SelfCompression(20.0, init_bits=2, lr=0.2, remove_channels=True, shift_decay=0.05, **kw)


def test_every_removal_preserves_outputs(trainer_kwargs, monkeypatch, tmp_path):
    records = []
    original = ChannelRemover.remove

    def spy(self, plan, optimizers=()):
        net = self.graph.model.net
        train_copy = copy.deepcopy(net).train()
        net.eval()
        with torch.no_grad():
            before = (net(X), train_copy(X))
            out = original(self, plan, optimizers)
            records.append((before, (net(X), copy.deepcopy(net).train()(X)), out))
        net.train()
        return out

    monkeypatch.setattr(ChannelRemover, "remove", spy)
    model = TinyConvNet(optimizer="adam", lr=0.05)
    callback = _shrinking()
    logger = CSVLogger(tmp_path, name="log")
    trainer = pl.Trainer(max_steps=24, callbacks=[callback], **{**trainer_kwargs, "logger": logger})
    trainer.fit(model, datamodule=_data())
    assert records, "no removal happened"
    for (eval0, train0), (eval1, train1), removed in records:
        assert removed and all(n > 0 for n in removed.values())
        torch.testing.assert_close(eval1, eval0, atol=1e-5, rtol=0)
        torch.testing.assert_close(train1, train0, atol=1e-5, rtol=0)
    events = callback.removal.events
    assert events and all(isinstance(s, int) and n > 0 for s, _, n in events)
    report = {c["layer"]: c for c in callback.channels}
    assert report["net.0.0"]["channels_before"] == 8
    assert report["net.0.0"]["channels_after"] == model.net[0][0].out_channels < 8
    assert report["net.4"]["channels_after"] == 3  # the network output is never shrunk
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    logged = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "self_compression/removed/net.0.0" in logged  # removal events reach the logger


class DeadFromStart(Callback):
    """Channels 1 and 4 of both convs dead from the first step (bits < 0, BN shift < 0)."""

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            for name, (_layer, q) in quantized_layers(pl_module).items():
                if name != "net.4":
                    q.bits[[1, 4]] = -1.0
            for i in (0, 1):
                pl_module.net[i][1].bias[[1, 4]] = -0.5


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw_amsgrad"])
def test_same_result_as_removing_at_the_end(trainer_kwargs, optimizer):
    """Seed claim: removing during training == training the masked network and removing at the end."""
    finals = []
    for during in (True, False):
        pl.seed_everything(0)
        opt = dict(optimizer="adamw", weight_decay=0.01) if optimizer == "adamw_amsgrad" else dict(optimizer=optimizer)
        model = AmsgradTiny(amsgrad=optimizer == "adamw_amsgrad", lr=0.05, **opt)
        callback = SelfCompression(0.0, init_bits=4, remove_channels=True, shift_decay=0.05)
        if not during:
            callback.removal.atol = -1.0  # decide and shrink constants, but never remove
        trainer = pl.Trainer(max_steps=12, callbacks=[DeadFromStart(), callback], **trainer_kwargs)
        trainer.fit(model, datamodule=_data())
        removal = callback.removal
        if not during:
            assert not removal.events
            removal.remover.remove(removal.graph.removable(removal.dead(model), 1e-6))
        else:
            assert removal.events and removal.events[0][0] == 1
        model.eval()
        finals.append(model)
    a, b = finals
    assert a.net[0][0].out_channels == b.net[0][0].out_channels == 6
    torch.testing.assert_close(a(X), b(X), atol=1e-5, rtol=1e-4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)


class AmsgradTiny(TinyConvNet):
    def __init__(self, amsgrad: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.amsgrad = amsgrad

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        for group in opt.param_groups:
            if "amsgrad" in group:
                group["amsgrad"] = self.amsgrad
        return opt


def test_checkpoint_resume_is_bit_identical_and_loads_for_inference(trainer_kwargs, tmp_path):
    kw = {**trainer_kwargs, "enable_checkpointing": True, "limit_val_batches": 0}
    pl.seed_everything(0)
    full = TinyConvNet(optimizer="adam", lr=0.05)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    cb_full = _shrinking(compute_gamma=5.0)  # its positions are read again on the first batch after resume
    pl.Trainer(max_epochs=3, callbacks=[cb_full, ckpt], **kw).fit(full, datamodule=_data())
    assert cb_full.removal.events and cb_full.removal.events[0][0] <= 16  # removal before the epoch-1 checkpoint
    epoch1 = tmp_path / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(epoch1, weights_only=False)
    assert saved["state_dict"]["net.0.0.parametrizations.weight.original"].shape[0] < 8

    pl.seed_everything(0)
    resumed = TinyConvNet(optimizer="adam", lr=0.05)  # freshly built, full size
    cb_res = _shrinking(compute_gamma=5.0)
    pl.Trainer(max_epochs=3, callbacks=[cb_res], **kw).fit(resumed, datamodule=_data(), ckpt_path=epoch1)
    assert resumed.state_dict().keys() == full.state_dict().keys()
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert cb_res.removal.events == cb_full.removal.events
    assert {k: {d: v.tolist() for d, v in e.items()} for k, e in cb_res.removal.kept.items()} == {
        k: {d: v.tolist() for d, v in e.items()} for k, e in cb_full.removal.kept.items()
    }

    last = tmp_path / "ckpt" / "epoch=2.ckpt"
    validated = TinyConvNet(optimizer="adam", lr=0.05)  # validate(ckpt_path) with the callback loads too
    kw_val = {**kw, "limit_val_batches": None, "enable_checkpointing": False}
    pl.Trainer(callbacks=[cb_full], **kw_val).validate(validated, datamodule=_data(), ckpt_path=last)
    assert validated.net[0][0].out_channels == full.net[0][0].out_channels < 8
    assert cb_full.removal.original["net.0.0"] == 8  # validating did not restart the size record
    with pytest.raises(RuntimeError):
        TinyConvNet.load_from_checkpoint(last)  # full-size float model: keys and shapes differ
    loaded = load_compressed(TinyConvNet, str(last))
    assert type(loaded) is TinyConvNet
    full.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(X), full(X), rtol=0, atol=0)


def test_non_finite_loss_skips_removal():
    removal = ChannelRemoval()
    removal.on_before_backward(torch.tensor(float("nan")))
    trainer = SimpleNamespace(global_step=3, strategy=None, world_size=1)
    with pytest.warns(UserWarning, match="no channel removal this step"):
        removal.after_step(trainer, None, repaired=0, step=4)
    assert removal.graph is None and not removal.events
    with pytest.warns(UserWarning, match="no channel removal this step"):
        removal.after_step(trainer, None, repaired=2, step=5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(removal_interval=0), "`removal_interval` must be an integer >= 1, got 0"),
        (dict(shift_decay=-1.0), "`shift_decay` must be a finite number >= 0, got -1.0"),
        (dict(remove_channels="yes"), "`remove_channels` must be True or False, got 'yes'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        SelfCompression(1.0, **kwargs)


class GatedModule(TinyConvNet):
    """TinyConvNet whose forward gates the first block by a sigmoid of itself (unsupported)."""

    def forward(self, x):
        h = self.net[0](x)
        h = h * torch.sigmoid(h)
        return self.net[4](self.net[3](self.net[2](self.net[1](h))))


def test_unsupported_pattern_warns_once_and_keeps_channels(trainer_kwargs):
    model = GatedModule(optimizer="adam", lr=0.05)
    callback = _shrinking()
    trainer = pl.Trainer(max_steps=24, callbacks=[callback], **trainer_kwargs)
    with pytest.warns(UserWarning, match="keeps the channels involved in") as record:
        trainer.fit(model, datamodule=_data())
    assert len([w for w in record if "keeps the channels" in str(w.message)]) == len(callback.removal.graph.unsupported) - 1
    assert model.net[0][0].out_channels == 8  # gated: frozen
    assert callback.removal.dead(model)["net.0.0"].any()  # although some of its channels died
    assert model.net[1][0].out_channels < 8  # the supported part still shrank


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_refused_at_setup(strategy):
    trainer = SimpleNamespace(strategy=type(strategy, (), {})())
    with pytest.raises(RuntimeError, match=f"does not support strategy {strategy}.*supported: single device, 'ddp'"):
        _shrinking().setup(trainer, TinyConvNet(), "fit")


def test_fp16_skipped_steps_do_not_count_and_removal_works(trainer_kwargs):
    from tests.helpers import InjectInfGrad, fp16_cpu_plugin

    model = TinyConvNet(optimizer="adam", lr=0.05)
    callback = _shrinking()
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=8, plugins=[fp16_cpu_plugin()],
                         callbacks=[InjectInfGrad({2}), callback], **trainer_kwargs)
    trainer.fit(model, datamodule=_data())
    ran = int(trainer.optimizers[0].state[model.net[4].bias]["step"])  # Adam counts the steps that ran
    assert callback.step_positions() == [ran] and ran < 3 * 8  # GradScaler-skipped steps (the injected inf, too) don't count
    assert callback.removal.events and model.net[0][0].out_channels < 8
    assert torch.isfinite(model(X)).all()


class _Double(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


@pytest.mark.parametrize("extra_parametrization", [False, True])
def test_dead_quantises_only_rule_dead_rows_with_the_same_answer(extra_parametrization):
    """``ChannelRemoval.dead`` (every decision) quantises only the rows whose bits are <= 0; the answer is
    that of the full rule: bits <= 0 AND the layer's actual weight row is exactly 0."""
    torch.manual_seed(0)
    net = TinyConvNet().net
    attach_quantizers(net, init_bits=4)
    layers = quantized_layers(net)
    if extra_parametrization:
        for layer, _ in layers.values():
            parametrize.register_parametrization(layer, "weight", _Double())
    with torch.no_grad():
        for _, q in layers.values():
            q.bits.copy_(torch.rand(q.bits.shape) * 3 - 1.5)
            q.exponent.add_(torch.randn(q.exponent.shape))
    got = ChannelRemoval.dead(net)
    for name, (layer, q) in layers.items():
        want = dead_channels(q) & (layer.weight.detach().flatten(1) == 0).all(1)
        assert torch.equal(got[name], want) and got[name].any(), name
