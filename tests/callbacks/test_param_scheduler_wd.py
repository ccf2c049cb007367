"""ParamScheduler driving ``weight_decay`` together with DecoupledWeightDecay (which reads λ from
``group["weight_decay"]`` in its pre-step hook and zeroes it during the step): the decay applied
at every step is the scheduled one, in either callback order, and across a resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from examples.tiny import TinyClassifier
from pl_optim.callbacks import DecoupledWeightDecay, ParamScheduler, StepHookCallback
from pl_optim.schedules import Linear
from tests.callbacks.test_one_cycle import StopAfterEpoch, fit

WD = Linear(0.1, 0.01)


class LambdaProbe(StepHookCallback):
    def __init__(self):
        self.used: list[float] = []

    def after_step(self, trainer, index, optimizer):
        dwd = next(c for c in trainer.callbacks if isinstance(c, DecoupledWeightDecay))
        self.used.append(dwd.decays[0].lambdas[0])


def _callbacks(order):
    sched, dwd = ParamScheduler({"weight_decay": WD}), DecoupledWeightDecay(0.0, mode="lr")
    return ([sched, dwd] if order == "scheduler_first" else [dwd, sched]) + [LambdaProbe()]


@pytest.mark.parametrize("order", ["scheduler_first", "decay_first"])
def test_decoupled_decay_uses_the_scheduled_lambda(trainer_kwargs, order):
    cbs = _callbacks(order)
    fit(cbs, trainer_kwargs, TinyClassifier(optimizer="adam"), max_steps=6)
    assert cbs[-1].used == pytest.approx([WD(k, 6) for k in range(6)], rel=1e-12)


@pytest.mark.parametrize("order", ["scheduler_first", "decay_first"])
def test_resume_with_decoupled_decay_is_exact(trainer_kwargs, tmp_path, order):
    kw = dict(limit_train_batches=3, max_epochs=4)
    full = _callbacks(order)
    _, m_full = fit(full, trainer_kwargs, TinyClassifier(optimizer="adam"), **kw)
    pl.seed_everything(0)  # same initial weights as the uninterrupted run
    first = _callbacks(order)
    t1, _ = fit([*first, StopAfterEpoch(1)], trainer_kwargs, TinyClassifier(optimizer="adam"), **kw)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    second = _callbacks(order)
    _, m_res = fit(second, trainer_kwargs, TinyClassifier(optimizer="adam"), ckpt_path=str(tmp_path / "half.ckpt"), **kw)
    assert first[-1].used + second[-1].used == full[-1].used
    assert len(full[-1].used) == 12
    assert all(torch.equal(a, b) for a, b in zip(m_full.parameters(), m_res.parameters()))
