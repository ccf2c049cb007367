"""Every pl_optim callback under every precision: trains, resumes bit for bit from a checkpoint,
and counts only the optimizer steps that ran (an inf gradient is injected once under the
precisions that skip such steps)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from examples.tiny import RandomClassificationData, TinyConvNet
from pl_optim.callbacks import (
    AMSGradToggle,
    DecoupledWeightDecay,
    LRRangeTest,
    OneCycle,
    ParamScheduler,
    SelfCompression,
    StepHookCallback,
)
from pl_optim.schedules import Cosine
from pl_optim.steps import StepLedger
from tests.callbacks._precision_common import PRECISIONS, InjectAtStep

CALLBACKS = {
    "OneCycle": lambda: OneCycle(max_lr=0.02),
    "ParamScheduler": lambda: ParamScheduler({"lr": Cosine(0.02, 0.001)}),
    "DecoupledWeightDecay": lambda: DecoupledWeightDecay(0.1),
    "AMSGradToggle": lambda: AMSGradToggle({1: True}),
    "SelfCompression": lambda: SelfCompression(1.0, init_bits=4, remove_channels=True, shift_decay=0.05),
    "LRRangeTest": lambda: LRRangeTest(num_steps=3, plot_path=None),
}
BATCHES = 3  # per epoch; 2 epochs; checkpoint after epoch 0


def _data():
    return RandomClassificationData(n=24, shape=(1, 8, 8), batch_size=8)


def _fit(kw, precision, callback, tmp_path, ckpt_path=None, save=False):
    pl.seed_everything(0, verbose=False)
    model = TinyConvNet(channels=(4, 4), lr=0.01)
    cb = CALLBACKS[callback]()
    extra = [InjectAtStep(1 if PRECISIONS[precision][1] else None)]
    if save:
        extra.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    trainer = pl.Trainer(max_epochs=2, plugins=[PRECISIONS[precision][0]()], callbacks=[cb, *extra], **kw)
    trainer.fit(model, datamodule=_data(), ckpt_path=ckpt_path)
    return trainer, model, cb


def _optimizer_tensors(opt):
    return [v for s in opt.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("callback", list(CALLBACKS))
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_callback_under_precision_resumes_and_counts(trainer_kwargs, tmp_path, precision, callback):
    kw = {**trainer_kwargs, "enable_checkpointing": True, "limit_val_batches": 0}
    skips = PRECISIONS[precision][1]
    trainer, model, cb = _fit(kw, precision, callback, tmp_path, save=True)
    ledger = StepLedger.of(trainer.optimizers[0])
    ran = 2 * BATCHES - (1 if skips else 0)
    assert (ledger.steps, ledger.skipped, trainer.global_step) == (ran, int(skips), ran)
    if isinstance(cb, StepHookCallback):
        assert cb.step_positions() == [ran]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    kw["enable_checkpointing"] = False
    resumed_trainer, resumed, _ = _fit(kw, precision, callback, tmp_path / "r", ckpt_path=tmp_path / "epoch=0.ckpt")
    assert resumed_trainer.global_step == ran
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for a, b in zip(_optimizer_tensors(trainer.optimizers[0]), _optimizer_tensors(resumed_trainer.optimizers[0]), strict=True):
        assert torch.equal(a, b)
