"""AMSGradToggle through a real Trainer: parity with Adam(amsgrad=True), epoch/step schedules,
checkpoints saved under the other setting, logging, bad input."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim.callbacks import AMSGradToggle, StepHookCallback
from tests.callbacks.test_decoupled_weight_decay import CaptureLogger

IMPLS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


class AdamModule(TinyClassifier):
    def __init__(self, amsgrad: bool = False, adamw: bool = False, impl: str = "foreach"):
        self.amsgrad, self.adamw, self.impl = amsgrad, adamw, impl
        super().__init__()

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.adamw else torch.optim.Adam
        return cls(self.parameters(), lr=1e-2, amsgrad=self.amsgrad, **IMPLS[self.impl])


class FlagProbe(StepHookCallback):
    """group["amsgrad"] at every optimizer step (registered after the toggle's pre-hook)."""

    def __init__(self):
        self.flags: list[bool] = []

    def before_step(self, trainer, index, optimizer):
        self.flags.append(optimizer.param_groups[0]["amsgrad"])


def _fit(trainer_kwargs, model, callbacks, ckpt_path=None, **kw) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=callbacks, **{**trainer_kwargs, **kw})
    trainer.fit(model, datamodule=RandomClassificationData(), ckpt_path=ckpt_path)
    return trainer


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("adamw,impl", [(False, "single"), (True, "foreach"), (False, "fused")])
def test_toggle_from_step_zero_equals_native_amsgrad(trainer_kwargs, adamw, impl):
    pl.seed_everything(0)
    ref = AdamModule(True, adamw, impl)
    _fit(trainer_kwargs, ref, [], max_steps=40)
    pl.seed_everything(0)
    ours = AdamModule(False, adamw, impl)
    _fit(trainer_kwargs, ours, [AMSGradToggle({0: True}, interval="step")], max_steps=40)
    assert torch.equal(_weights(ref), _weights(ours))
    pl.seed_everything(0)
    plain = AdamModule(False, adamw, impl)
    _fit(trainer_kwargs, plain, [], max_steps=40)
    assert not torch.equal(_weights(ref), _weights(plain))


def test_step_schedule_counts_steps_that_ran(trainer_kwargs):
    probe = FlagProbe()
    toggle = AMSGradToggle({0: False, 2: True, 4: False}, interval="step")
    trainer = _fit(
        trainer_kwargs, AdamModule(), [toggle, probe], max_epochs=1, limit_train_batches=15, accumulate_grad_batches=3
    )
    assert probe.flags == [False, False, True, True, False]
    assert toggle.steps == [5] and "max_exp_avg_sq" not in next(iter(trainer.optimizers[0].state.values()))


def test_epoch_schedule_and_logging(trainer_kwargs):
    probe, logger = FlagProbe(), CaptureLogger()
    _fit(
        trainer_kwargs, AdamModule(), [AMSGradToggle({1: True, 2: False}), probe],
        max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=logger, log_every_n_steps=1,
    )
    assert probe.flags == [False, False, True, True, False, False]
    assert logger.values("amsgrad-Adam") == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("saved", [False, True])
def test_resume_from_checkpoint_saved_under_the_other_setting(trainer_kwargs, tmp_path, saved):
    """Train under one setting, save, resume with a toggle forcing the other: no KeyError, the
    state matches the new setting, and the trajectory equals the native optimizer's when the
    switch comes from a checkpoint made under amsgrad=False (max starts from exp_avg_sq)."""
    epochs = dict(limit_train_batches=4, limit_val_batches=0)
    pl.seed_everything(0)
    first = AdamModule(saved)
    trainer = _fit(trainer_kwargs, first, [], max_epochs=1, **epochs)
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    pl.seed_everything(0)
    probe = FlagProbe()
    resumed = AdamModule(saved)
    trainer = _fit(trainer_kwargs, resumed, [AMSGradToggle({0: not saved}), probe], ckpt_path=path, max_epochs=3, **epochs)
    assert probe.flags == [not saved] * 8
    states = list(trainer.optimizers[0].state.values())
    assert states and all(("max_exp_avg_sq" in s) == (not saved) for s in states)
    # the same switch made by hand on the restored optimizer gives the same weights
    pl.seed_everything(0)
    manual = AdamModule(saved)

    class ManualSwitch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            from pl_optim import set_amsgrad

            set_amsgrad(trainer.optimizers[0], not saved)

    _fit(trainer_kwargs, manual, [ManualSwitch()], ckpt_path=path, max_epochs=3, **epochs)
    assert torch.equal(_weights(manual), _weights(resumed))


def test_step_counter_survives_resume(trainer_kwargs, tmp_path):
    epochs = dict(limit_train_batches=3, limit_val_batches=0)
    trainer = _fit(trainer_kwargs, AdamModule(), [AMSGradToggle({4: True}, interval="step")], max_epochs=1, **epochs)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    probe = FlagProbe()
    toggle = AMSGradToggle({4: True}, interval="step")
    _fit(trainer_kwargs, AdamModule(), [toggle, probe], ckpt_path=path, max_epochs=2, **epochs)
    assert probe.flags == [False, True, True] and toggle.steps == [6]


def test_refuses_sgd_naming_it(trainer_kwargs):
    with pytest.raises(ValueError, match="SGD has no `amsgrad` option"):
        _fit(trainer_kwargs, TinyClassifier(optimizer="sgd"), [AMSGradToggle({0: True})], max_steps=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule={-1: True}), r"`schedule key` must be an integer >= 0, got -1"),
        (dict(schedule={1.5: True}), r"`schedule key` must be an integer >= 0, got 1.5"),
        (dict(schedule={"3": True}), r"`schedule key` must be an integer >= 0, got '3'"),
        (dict(schedule={True: True}), r"`schedule key` must be an integer >= 0, got True"),
        (dict(schedule={0: 1}), r"`schedule\[0\]` must be True or False, got 1"),
        (dict(schedule={}), r"`schedule` must be a non-empty mapping"),
        (dict(schedule=[0, 1]), r"`schedule` must be a non-empty mapping .*got \[0, 1\]"),
        (dict(schedule={0: True}, interval="batch"), r"`interval` must be one of \('epoch', 'step'\), got 'batch'"),
        (dict(schedule={0: True}, optimizers=-1), r"`optimizers` must be None, an index >= 0 .*got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AMSGradToggle(**kwargs)
