"""The shared mechanism: StepHookCallback fires exactly on optimizer steps that ran."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim import StepHooks
from pl_optim.callbacks import StepHookCallback
from tests.helpers import InjectInfGrad, fp16_cpu_plugin


class Recorder(StepHookCallback):
    def __init__(self):
        self.pre, self.post = 0, 0

    def before_step(self, trainer, index, optimizer):
        self.pre += 1

    def after_step(self, trainer, index, optimizer):
        self.post += 1


def test_core_hooks_fire_only_on_real_steps():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    calls = []
    hooks = StepHooks([opt], pre=lambda i, o: calls.append(("pre", i)), post=lambda i, o: calls.append(("post", i)))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(p.sum()).backward()
    p.grad.fill_(float("inf"))
    scaler.step(opt)  # inf: skipped, no hook
    scaler.update()
    assert calls == []
    p.grad = torch.ones(3)
    opt.step()
    assert calls == [("pre", 0), ("post", 0)]
    hooks.remove()
    opt.step()
    assert len(calls) == 2


def test_core_hooks_refuse_non_optimizers():
    with pytest.raises(TypeError, match="optimizer 0 is a list"):
        StepHooks([[1, 2]])


@pytest.mark.parametrize("accumulate,expected", [(1, 12), (3, 4)])
def test_callback_counts_steps_under_accumulation(trainer_kwargs, accumulate, expected):
    rec = Recorder()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=12, accumulate_grad_batches=accumulate, callbacks=[rec], **trainer_kwargs)
    trainer.fit(TinyClassifier(), datamodule=RandomClassificationData())
    assert (rec.pre, rec.post) == (expected, expected) == (trainer.global_step,) * 2


def test_callback_skips_amp_skipped_steps(trainer_kwargs):
    rec = Recorder()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=10, plugins=[fp16_cpu_plugin()], callbacks=[rec, InjectInfGrad({2, 5, 6})],
        **trainer_kwargs,
    )
    trainer.fit(TinyClassifier(), datamodule=RandomClassificationData())
    assert (rec.pre, rec.post) == (7, 7)
