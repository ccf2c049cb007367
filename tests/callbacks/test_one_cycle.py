"""OneCycle callback: torch parity through a Trainer, counting of steps that ran, exact resume."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim.callbacks import OneCycle, StepHookCallback
from pl_optim.param_groups import read_field
from pl_optim.schedules import one_cycle
from tests.helpers import InjectInfGrad, fp16_cpu_plugin


class Probe(StepHookCallback):
    """Records, right before every optimizer step that runs, the values in the param groups."""

    def __init__(self, fields=("lr", "momentum")):
        self.fields = fields
        self.trace: list[tuple] = []

    def before_step(self, trainer, index, optimizer):
        row = []
        for g in optimizer.param_groups:
            for f in self.fields:
                key = "betas[0]" if f == "momentum" and "betas" in g else f
                row.append(read_field(g, key))
        self.trace.append((index, *row))


def expected_trace(total, steps, max_lrs=(0.1,), **kw):
    scheds = [one_cycle(m, **kw) for m in max_lrs]
    return [(0, *[v for lr, mom in scheds for v in (lr(min(k, total - 1), total), mom(min(k, total - 1), total))])
            for k in range(steps)]


def fit(callbacks, trainer_kwargs, model=None, ckpt_path=None, **kw):
    trainer = pl.Trainer(callbacks=callbacks, **{**trainer_kwargs, **kw})
    model = model or TinyClassifier(optimizer="sgd", lr=0.01)
    trainer.fit(model, datamodule=RandomClassificationData(), ckpt_path=ckpt_path)
    return trainer, model


class TorchOneCycleModule(TinyClassifier):
    def __init__(self, total, **kw):
        super().__init__(**kw)
        self.total = total

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=self.total, three_phase=True)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_same_trace_and_weights_as_torch_onecyclelr_in_lightning(trainer_kwargs, optimizer):
    """OneCycle == torch's OneCycleLR returned from configure_optimizers: same lr/momentum at
    every step (bit-identical) and bit-identical final weights."""
    ours, theirs = Probe(), Probe()
    _, m1 = fit([OneCycle(0.1, three_phase=True), ours], trainer_kwargs, TinyClassifier(optimizer=optimizer), max_steps=13)
    pl.seed_everything(0)
    _, m2 = fit([theirs], trainer_kwargs, TorchOneCycleModule(13, optimizer=optimizer), max_steps=13)
    assert len(ours.trace) == 13 and ours.trace == theirs.trace
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_accumulation_counts_optimizer_steps(trainer_kwargs):
    probe, cb = Probe(), OneCycle(0.1, anneal_strategy="linear")
    fit([cb, probe], trainer_kwargs, max_epochs=2, limit_train_batches=12, accumulate_grad_batches=3)
    assert cb.totals == [8] and cb.steps == [8]
    assert probe.trace == expected_trace(8, 8, anneal_strategy="linear")


def test_gradient_accumulation_scheduler_total(trainer_kwargs):
    """{epoch 0: 1, epoch 1: 3} over 12 batches: 12 + 4 = 16 steps (estimated_stepping_batches says 24)."""
    probe, cb = Probe(), OneCycle(0.1)
    trainer, _ = fit([GradientAccumulationScheduler({0: 1, 1: 3}), cb, probe], trainer_kwargs, max_epochs=2, limit_train_batches=12)
    assert cb.totals == [16] and cb.steps == [16] and trainer.global_step == 16
    assert probe.trace == expected_trace(16, 16)


def test_max_steps_and_limit_train_batches(trainer_kwargs):
    cb = OneCycle(0.1)
    fit([cb], trainer_kwargs, max_epochs=5, limit_train_batches=4, max_steps=11)
    assert cb.totals == [11] and cb.steps == [11]
    cb = OneCycle(0.1)
    fit([cb], trainer_kwargs, max_epochs=3, limit_train_batches=0.25)  # 16 batches -> 4 a epoch
    assert cb.totals == [12] and cb.steps == [12]


def test_amp_skipped_steps_do_not_advance(trainer_kwargs):
    probe, cb = Probe(), OneCycle(0.1)
    fit([cb, probe, InjectInfGrad({2, 5})], trainer_kwargs, max_epochs=1, limit_train_batches=10, plugins=[fp16_cpu_plugin()])
    assert cb.totals == [10] and cb.steps == [8]
    assert probe.trace == expected_trace(10, 8)


def test_past_the_end_holds_and_warns_once(trainer_kwargs):
    probe, cb = Probe(), OneCycle(0.1, total_steps=5)
    with pytest.warns(UserWarning, match="past the end of its schedule") as record:
        fit([cb, probe], trainer_kwargs, max_steps=9)
    assert sum("past the end" in str(w.message) for w in record) == 1
    assert probe.trace == expected_trace(5, 9)
    assert probe.trace[-1] == probe.trace[4]


def test_no_warning_when_the_run_ends_with_the_schedule(trainer_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*(workers|GPU|TPU|HPU|`max_epochs` was not set).*")
        fit([OneCycle(0.1)], trainer_kwargs, max_steps=6)


def test_per_group_max_lr_and_beta2(trainer_kwargs):
    class TwoGroups(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}], lr=1e-3)

    probe = Probe(fields=("lr", "momentum", "betas[1]"))
    fit([OneCycle([0.01, 0.1], beta2=0.99), probe], trainer_kwargs, TwoGroups(), max_steps=7)
    (a_lr, a_m), (b_lr, b_m) = one_cycle(0.01), one_cycle(0.1)
    assert probe.trace == [(0, a_lr(k, 7), a_m(k, 7), 0.99, b_lr(k, 7), b_m(k, 7), 0.99) for k in range(7)]


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _resume_run(trainer_kwargs, tmp_path, second_max_epochs, **one_cycle_kw):
    """Run 2 of 4 epochs, checkpoint, resume with `second_max_epochs`; return both probes."""
    kw = dict(limit_train_batches=4, max_epochs=4)
    p1 = Probe()
    t1, _ = fit([OneCycle(0.1, **one_cycle_kw), p1, StopAfterEpoch(1)], trainer_kwargs, TinyClassifier(optimizer="adam"), **kw)
    ckpt = str(tmp_path / "half.ckpt")
    t1.save_checkpoint(ckpt)
    p2, cb2 = Probe(), OneCycle(0.1, **one_cycle_kw)
    kw["max_epochs"] = second_max_epochs
    _, model = fit([cb2, p2], trainer_kwargs, TinyClassifier(optimizer="adam"), ckpt_path=ckpt, **kw)
    return p1, p2, cb2, model


def test_exact_resume(trainer_kwargs, tmp_path):
    full = Probe()
    _, m_full = fit([OneCycle(0.1, beta2=0.99), full], trainer_kwargs, TinyClassifier(optimizer="adam"),
                    limit_train_batches=4, max_epochs=4)
    pl.seed_everything(0)
    p1, p2, cb2, m_res = _resume_run(trainer_kwargs, tmp_path, 4, beta2=0.99)
    assert len(p1.trace) == 8 and len(full.trace) == 16
    assert p1.trace + p2.trace == full.trace
    assert cb2.steps == [16] and cb2.totals == [16]
    assert all(torch.equal(a, b) for a, b in zip(m_full.parameters(), m_res.parameters()))


def test_resume_with_more_epochs_keeps_checkpoint_total(trainer_kwargs, tmp_path):
    with pytest.warns(UserWarning, match=r"schedule length \[16\] differs from this run's \[24\]"):
        _, p2, cb2, _ = _resume_run(trainer_kwargs, tmp_path, 6)
    assert cb2.totals == [16] and cb2.steps == [24]
    assert p2.trace == expected_trace(16, 24)[8:]  # positions 16..23 hold the final value


def test_resume_with_more_epochs_on_resume_trainer(trainer_kwargs, tmp_path):
    with pytest.warns(UserWarning, match="using this run's length"):
        _, p2, cb2, _ = _resume_run(trainer_kwargs, tmp_path, 6, on_resume="trainer")
    assert cb2.totals == [24] and cb2.steps == [24]
    assert p2.trace == expected_trace(24, 24)[8:]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_lr": 0}, r"`max_lr` must be > 0, got 0"),
        ({"max_lr": [0.1, -1.0]}, r"`max_lr` must be > 0, got -1.0"),
        ({"max_lr": "auto"}, r"`max_lr` must be a positive number, a list of them, or 'find', got 'auto'"),
        ({"pct_start": 1.5}, r"`pct_start` must be in \(0, 1\), got 1.5"),
        ({"div_factor": 0.0}, r"`div_factor` must be > 0, got 0.0"),
        ({"final_div_factor": -1}, r"`final_div_factor` must be > 0, got -1"),
        ({"base_momentum": 1.2}, r"`base_momentum` must be in \[0, 1\), got 1.2"),
        ({"max_momentum": [0.9, 1.0]}, r"`max_momentum` must be in \[0, 1\), got 1.0"),
        ({"anneal_strategy": "cosine"}, r"`anneal_strategy` must be one of \('cos', 'linear'\), got 'cosine'"),
        ({"beta2": 1.0}, r"`beta2` must be in \[0, 1\) or None, got 1.0"),
        ({"total_steps": 0}, r"`total_steps` must be an integer >= 1, got 0"),
        ({"optimizers": -1}, r"`optimizers` must be None, an index >= 0 or a list of distinct ones, got -1"),
        ({"on_resume": "restart"}, r"`on_resume` must be one of \('checkpoint', 'trainer'\), got 'restart'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OneCycle(**{"max_lr": 0.1, **kwargs})


@pytest.mark.parametrize(
    "cb,model,match",
    [
        (OneCycle(0.1), TinyClassifier(optimizer="adagrad"), "`cycle_momentum=True` but Adagrad has neither"),
        (OneCycle([0.1, 0.2, 0.3]), TinyClassifier(), r"`max_lr` has 3 values but there are 1 param groups"),
        (OneCycle(0.1, beta2=0.99), TinyClassifier(optimizer="sgd"), "`beta2=0.99` needs an Adam-family optimizer"),
        (OneCycle(0.1), TorchOneCycleModule(5), "also gives the torch scheduler OneCycleLR"),
        (OneCycle("find"), TinyClassifier(), r"needs an LRRangeTest callback"),
        (OneCycle(0.1, optimizers=[1]), TinyClassifier(), r"`optimizers` is 1 but the model configures 1 optimizer"),
    ],
)
def test_bad_setup(trainer_kwargs, cb, model, match):
    with pytest.raises(ValueError, match=match):
        fit([cb], trainer_kwargs, model, max_steps=5)


def test_unbounded_run_needs_total_steps(trainer_kwargs):
    with pytest.raises(ValueError, match="cannot derive the schedule length"):
        fit([OneCycle(0.1)], trainer_kwargs, max_epochs=-1, max_steps=-1)


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, generator=g), torch.randint(0, 3, (), generator=g)


def test_iterable_dataset_uses_max_steps(trainer_kwargs):
    cb = OneCycle(0.1)
    trainer = pl.Trainer(callbacks=[cb], max_steps=7, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(TinyClassifier(), train_dataloaders=torch.utils.data.DataLoader(Stream(), batch_size=4))
    assert cb.totals == [7] and cb.steps == [7]
    with pytest.raises(ValueError, match=r"cannot derive the schedule length from the Trainer \(got inf\)"):
        pl.Trainer(callbacks=[OneCycle(0.1)], max_epochs=1, limit_val_batches=0, **trainer_kwargs).fit(
            TinyClassifier(), train_dataloaders=torch.utils.data.DataLoader(Stream(), batch_size=4))


def test_mid_epoch_resume_continues_the_trace(trainer_kwargs, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = {**trainer_kwargs, "max_epochs": 2, "limit_train_batches": 6, "limit_val_batches": 0}
    full = Probe()
    fit([OneCycle(0.1), full], kw, TinyClassifier(optimizer="adam"))
    p1 = Probe()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    fit([OneCycle(0.1), p1, ckpt], {**kw, "enable_checkpointing": True}, TinyClassifier(optimizer="adam"))
    p2, cb = Probe(), OneCycle(0.1)
    fit([cb, p2], kw, TinyClassifier(optimizer="adam"), ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert cb.steps == [12] and cb.totals == [12]
    assert p1.trace[:4] + p2.trace == full.trace
