"""Reduce-on-plateau for any param-group field through ParamScheduler: equals torch's
ReduceLROnPlateau epoch for epoch on the same metric sequence, resumes exactly, and names a
metric that was never logged."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim.callbacks import ParamScheduler
from pl_optim.plateau import Plateau

SEQ = [1.0, 0.9, 0.9, 0.95, 0.92, 0.91, 0.5, 0.5, 0.6, 0.7]


class LogsASequence(TinyClassifier):
    """Logs ``metric`` = SEQ[epoch] (a known sequence, as if it were a validation loss)."""

    def training_step(self, batch, batch_idx):
        self.log("metric", torch.tensor(SEQ[self.current_epoch]), on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


class Trace(pl.Callback):
    def __init__(self) -> None:
        self.values: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        g = trainer.optimizers[0].param_groups[0]
        self.values.append((g["lr"], g["weight_decay"]))


def run(trainer_kwargs, schedules, epochs, ckpt_path=None, extra=()):
    trace = Trace()
    trainer = pl.Trainer(**trainer_kwargs, max_epochs=epochs, limit_train_batches=2, limit_val_batches=0,
                         callbacks=[ParamScheduler(schedules), trace, *extra])
    trainer.fit(LogsASequence(optimizer="sgd", lr=0.1), datamodule=RandomClassificationData(), ckpt_path=ckpt_path)
    return trace.values, trainer


def torch_lrs(epochs: int, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    lrs = []
    for e in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(SEQ[e])
    return lrs


@pytest.mark.parametrize(
    "kwargs",
    [dict(patience=1, factor=0.5), dict(patience=0, cooldown=1, threshold=0.05, threshold_mode="abs"),
     dict(patience=1, factor=0.5, min_lr=0.03)],
)
def test_lr_plateau_equals_torch_reduce_lr_on_plateau_epoch_for_epoch(trainer_kwargs, kwargs):
    plateau_kw = {("min_value" if k == "min_lr" else k): v for k, v in kwargs.items()}
    values, _ = run(trainer_kwargs, {"lr": Plateau(initial=0.1, monitor="metric", **plateau_kw)}, len(SEQ))
    assert [lr for lr, _ in values] == torch_lrs(len(SEQ), **kwargs)
    assert len(set(v for v, _ in values)) > 1  # it did reduce


def test_any_field_mode_max(trainer_kwargs):
    wd = Plateau(initial=0.01, mode="max", patience=0, factor=0.1, monitor="metric")
    values, _ = run(trainer_kwargs, {"weight_decay": wd}, 4)
    # SEQ 1.0 (best), 0.9 (bad -> x0.1), 0.9 (bad -> x0.1)
    assert [w for _, w in values] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert all(lr == 0.1 for lr, _ in values)


def test_resume_continues_the_plateau_exactly(trainer_kwargs, tmp_path):
    kw = dict(patience=1, factor=0.5, cooldown=1, monitor="metric", initial=0.1)
    straight, _ = run(trainer_kwargs, {"lr": Plateau(**kw)}, 8)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    run({**trainer_kwargs, "enable_checkpointing": True}, {"lr": Plateau(**kw)}, 4, extra=[ckpt])
    resumed, trainer = run(trainer_kwargs, {"lr": Plateau(**kw)}, 8, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed == straight[4:]
    cb = next(c for c in trainer.callbacks if isinstance(c, ParamScheduler))
    assert isinstance(cb.state_dict()["plateaus"][0]["best"], float)


def test_a_new_fit_starts_the_plateau_over(trainer_kwargs):
    plateau = Plateau(initial=0.1, patience=0, monitor="metric")
    first, _ = run(trainer_kwargs, {"lr": plateau}, 4)
    again, _ = run(trainer_kwargs, {"lr": plateau}, 4)
    assert first == again and first[-1][0] < 0.1


def test_a_metric_never_logged_is_named_with_the_available_ones(trainer_kwargs):
    with pytest.raises(ValueError, match=r"Plateau monitors 'val_loss', which was not logged by the end of epoch 0; "
                                         r"logged metrics: \['metric', 'train_acc', 'train_loss'\]"):
        run(trainer_kwargs, {"lr": Plateau(initial=0.1, monitor="val_loss")}, 2)
