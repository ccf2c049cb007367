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
from pl_optim.compression import attach_quantizers, dead_channels, dead_producers, quantized_layers
from pl_optim.compression.surgery import ChannelRemover

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _data():
    return RandomClassificationData(n=64, shape=(1, 8, 8), batch_size=8)


def _shrinking(gamma: float = 20.0, **kw):
    return SelfCompression(gamma, init_bits=2, lr=0.2, shift_decay=0.05, **{"remove_channels": True, **kw})


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
    events = callback.removal.core.events
    assert events and all(isinstance(s, int) and n > 0 for s, _, n in events)
    report = {c["layer"]: c for c in callback.channels}
    assert report["net.0.0"]["channels_before"] == 8
    assert report["net.0.0"]["channels_after"] == model.net[0][0].out_channels < 8
    assert report["net.4"]["channels_after"] == 3  # the network output is never shrunk
    dead = callback.removal.core.dead()
    assert all(c["dead_kept"] == int(dead[n].sum()) for n, c in report.items())  # what stays though dead
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
        callback = SelfCompression(0.0, init_bits=4, remove_channels=True, shift_decay=0.05, freeze_at=None)
        trainer = pl.Trainer(max_steps=12, callbacks=[DeadFromStart(), callback, *([] if during else [NeverRemove()])],
                             **trainer_kwargs)
        trainer.fit(model, datamodule=_data())
        removal = callback.removal.core
        if not during:
            assert not removal.events
            removal.apply(removal.graph.removable(removal.dead(), 1e-6))
        else:
            assert removal.events and removal.events[0][0] == 1
        model.eval()
        finals.append(model)
    a, b = finals
    assert a.net[0][0].out_channels == b.net[0][0].out_channels == 6
    torch.testing.assert_close(a(X), b(X), atol=1e-5, rtol=1e-4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)


class NeverRemove(Callback):
    """Decide and shrink constants, but never remove (a negative tolerance)."""

    def on_fit_start(self, trainer, pl_module):
        next(c for c in trainer.callbacks if isinstance(c, SelfCompression)).removal.core.atol = -1.0


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


def _outputs(model):
    model.eval()
    with torch.no_grad():
        out = model(X)
    model.train()
    with torch.no_grad():
        return out, copy.deepcopy(model)(X)


#: column cost -> (model kwargs, callback kwargs). With the column cost: SGD and a gentle gamma, so that channels are
#: removed before the epoch-1 checkpoint and some are still alive after it (the column term then moves the bits).
SETTINGS = {0.0: (dict(optimizer="adam", lr=0.05), dict(gamma=20.0, compute_gamma=5.0)),
            2.0: (dict(optimizer="sgd", lr=0.05), dict(gamma=0.8, compute_gamma=0.2))}


@pytest.mark.parametrize(("remove", "column"), [(True, 0.0), (False, 0.0), (True, 2.0)],
                         ids=["removal", "no-removal", "removal-column-cost"])
def test_checkpoints_load_into_the_plain_model_and_resume_exactly(trainer_kwargs, tmp_path, remove, column):
    kw = {**trainer_kwargs, "enable_checkpointing": True, "limit_val_batches": 0}
    net_kw, cb_kw = SETTINGS[column]
    pl.seed_everything(0)
    full = TinyConvNet(**net_kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    # positions are read again after resume, the graph of the column cost traced again
    cb_full = _shrinking(**cb_kw, remove_channels=remove, column_cost=column)
    pl.Trainer(max_epochs=3, callbacks=[cb_full, ckpt], **kw).fit(full, datamodule=_data())
    events = cb_full.removal.core.events if remove else []
    assert bool(events) == remove and (not remove or events[0][0] <= 16)  # removal before the epoch-1 checkpoint
    epoch1, last = tmp_path / "ckpt" / "epoch=1.ckpt", tmp_path / "ckpt" / "epoch=2.ckpt"

    # 1. the checkpoint's state_dict is the user's unmodified full-size model: strict load, same outputs
    plain = TinyConvNet.load_from_checkpoint(last)
    assert plain.state_dict().keys() == TinyConvNet().state_dict().keys()
    assert not quantized_layers(plain) and plain.net[0][0].out_channels == 8
    for got, want in zip(_outputs(plain), _outputs(full)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if remove:  # removed channels are exact zeros
        kept = cb_full.removal.core.kept["net.0.0"]["out"]
        gone = sorted(set(range(8)) - set(kept.tolist()))
        assert gone and (plain.net[0][0].weight[gone] == 0).all() and (plain.net[0][1].bias[gone] == 0).all()

    # 2. validate / test with ckpt_path and without the callback
    for run in ("validate", "test"):
        fresh = TinyConvNet(**net_kw)
        trainer = pl.Trainer(**{**kw, "limit_val_batches": None, "enable_checkpointing": False})
        if run == "test":
            fresh.test_step = fresh.validation_step
            fresh.test_dataloader = _data().val_dataloader
            trainer.test(fresh, ckpt_path=last)
        else:
            trainer.validate(fresh, datamodule=_data(), ckpt_path=last)
        torch.testing.assert_close(_outputs(fresh)[0], _outputs(full)[0], rtol=0, atol=1e-6)

    # 3. resume with the callback: bit-identical to the uninterrupted run, shapes included
    pl.seed_everything(0)
    resumed = TinyConvNet(**net_kw)  # freshly built, full size
    cb_res = _shrinking(**cb_kw, remove_channels=remove, column_cost=column)
    pl.Trainer(max_epochs=3, callbacks=[cb_res], **kw).fit(resumed, datamodule=_data(), ckpt_path=epoch1)
    assert resumed.state_dict().keys() == full.state_dict().keys()
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    if remove:
        assert cb_res.removal.core.events == cb_full.removal.core.events
        assert {k: {d: v.tolist() for d, v in e.items()} for k, e in cb_res.removal.core.kept.items()} == {
            k: {d: v.tolist() for d, v in e.items()} for k, e in cb_full.removal.core.kept.items()
        }

    # 4. validate(ckpt_path) with the callback gives the trained (quantised, shrunk) network back
    validated = TinyConvNet(**net_kw)
    pl.Trainer(callbacks=[cb_full], **{**kw, "limit_val_batches": None, "enable_checkpointing": False}).validate(
        validated, datamodule=_data(), ckpt_path=last)
    assert validated.net[0][0].out_channels == full.net[0][0].out_channels
    for key, value in full.state_dict().items():
        assert torch.equal(validated.state_dict()[key], value), key

    # 5. load_compressed: the genuinely smaller quantised network, bit-identical outputs
    loaded = load_compressed(TinyConvNet, str(last))
    assert type(loaded) is TinyConvNet and quantized_layers(loaded)
    assert (loaded.net[0][0].out_channels < 8) == remove
    for got, want in zip(_outputs(loaded), _outputs(full)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


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
    assert len([w for w in record if "keeps the channels" in str(w.message)]) == len(callback.removal.core.unsupported)
    assert model.net[0][0].out_channels == 8  # gated: frozen
    assert callback.removal.core.dead()["net.0.0"].any()  # although some of its channels died
    assert model.net[1][0].out_channels < 8  # the supported part still shrank


class BranchyModule(TinyConvNet):
    """TinyConvNet whose forward branches on the data: torch.fx cannot trace it."""

    def forward(self, x):
        return super().forward(x if x.sum() > 0 else -x)


@pytest.mark.parametrize("column", [0.0, 1.0])
def test_untraceable_model_warns_once_trains_on_and_is_traced_once(trainer_kwargs, monkeypatch, column):
    from pl_optim.compression.removal import ChannelRemoval

    calls = []
    original = ChannelRemoval.trace
    monkeypatch.setattr(ChannelRemoval, "trace", lambda self, x: calls.append(1) or original(self, x))
    model = BranchyModule(optimizer="adam", lr=0.05)
    callback = _shrinking(column_cost=column)
    with pytest.warns(UserWarning, match="channel removal disabled") as record:
        pl.Trainer(max_steps=12, callbacks=[callback], **trainer_kwargs).fit(model, datamodule=_data())
    assert len([w for w in record if "removal disabled" in str(w.message)]) == 1
    assert len(calls) == 1  # not again at every step (the column cost asks before every size gradient)
    assert callback.removal.interval == 1 and not callback.removal.core.events  # the argument left as given
    assert model.trainer.global_step == 12


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
    assert callback.removal.core.events and model.net[0][0].out_channels < 8
    assert torch.isfinite(model(X)).all()


class _Double(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


@pytest.mark.parametrize("extra_parametrization", [False, True])
def test_dead_quantises_only_rule_dead_rows_with_the_same_answer(extra_parametrization):
    """``dead_producers`` (every decision) quantises only the rows whose bits are <= 0; the answer is
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
    got = dead_producers(net)
    for name, (layer, q) in layers.items():
        want = dead_channels(q) & (layer.weight.detach().flatten(1) == 0).all(1)
        assert torch.equal(got[name], want) and got[name].any(), name


def test_one_summary_line_per_epoch_and_events_at_debug(trainer_kwargs, caplog):
    import logging

    model = TinyConvNet(optimizer="adam", lr=0.05)
    callback = _shrinking()
    with caplog.at_level(logging.DEBUG):
        pl.Trainer(max_epochs=3, callbacks=[callback], **trainer_kwargs).fit(model, datamodule=_data())
    events = callback.removal.core.events
    epochs_with_removals = {(step - 1) // 8 for step, _, _ in events}
    summaries = [r for r in caplog.records if r.levelno == logging.INFO and "removed" in r.getMessage()
                 and "channel(s)" in r.getMessage()]
    details = [r for r in caplog.records if r.levelno == logging.DEBUG and "optimizer step" in r.getMessage()]
    assert events and len(summaries) == len(epochs_with_removals)  # ONE line per epoch with removals
    assert len(details) == len({step for step, _, _ in events})  # every event, at debug level
