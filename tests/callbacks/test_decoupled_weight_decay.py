"""DecoupledWeightDecay through a real Trainer: AdamW parity, once per step that ran
(accumulation, AMP-skipped steps), double-decay guard, logging, checkpoints, bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim.callbacks import DecoupledWeightDecay, OneCycle, ParamScheduler
from pl_optim.schedules import Linear
from tests.core.test_weight_decay import BAD_ARGUMENTS
from tests.helpers import InjectInfGrad, fp16_cpu_plugin


class CaptureLogger(Logger):
    """Keeps every logged metric: ``self.metrics[name] = [(step, value), ...]``."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.metrics[name]]


class LrZeroSGD(TinyClassifier):
    """SGD with lr=0: the only change to the weights is the decay, w·(1 − λ)^steps."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class OneCycleAdam(TinyClassifier):
    """Adam/AdamW under torch's OneCycleLR, stepped every optimizer step."""

    def __init__(self, total: int, **kwargs):
        self.total = total
        super().__init__(**kwargs)

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WeightDecayProbe(Callback):
    """Records group["weight_decay"] as the optimizer's own update sees it: its pre-hook is
    registered at on_train_start (after DecoupledWeightDecay's) and reads the value after the
    closure (where the gradients, and our decay, happen) or right away when there is none."""

    def __init__(self):
        self.inside: list[float] = []

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]

        def record():
            self.inside.append(opt.param_groups[0]["weight_decay"])

        def hook(o, args, kwargs):
            closure = kwargs.get("closure")
            if closure is None:
                return record()

            def wrapped():
                loss = closure()
                record()
                return loss

            return args, {**kwargs, "closure": wrapped}

        self.handle = opt.register_step_pre_hook(hook)

    def teardown(self, trainer, pl_module, stage):
        self.handle.remove()


def _fit(trainer_kwargs, model, callbacks, **kw) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=callbacks, **{**trainer_kwargs, **kw})
    trainer.fit(model, datamodule=RandomClassificationData())
    return trainer


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("schedule", ["constant", "one_cycle"])
def test_adam_plus_decay_equals_adamw(trainer_kwargs, schedule):
    steps, lam, lr = 100, 0.3, 3e-3

    def make(optimizer, wd):
        pl.seed_everything(0)
        if schedule == "one_cycle":
            return OneCycleAdam(steps, optimizer=optimizer, lr=lr, weight_decay=wd)
        return TinyClassifier(optimizer=optimizer, lr=lr, weight_decay=wd)

    ref = make("adamw", lam)
    _fit(trainer_kwargs, ref, [], max_steps=steps)
    ours = make("adam", 0.0)
    probe = WeightDecayProbe()
    _fit(trainer_kwargs, ours, [DecoupledWeightDecay(lam, exclude_1d=False), probe], max_steps=steps)
    assert (_weights(ref) - _weights(ours)).abs().max().item() <= 1e-6
    assert probe.inside == [0.0] * steps  # the optimizer itself never saw λ
    plain = make("adam", 0.0)
    _fit(trainer_kwargs, plain, [], max_steps=steps)
    assert (_weights(ref) - _weights(plain)).abs().max().item() > 1e-4


def test_decay_once_per_step_that_ran_under_accumulation(trainer_kwargs):
    model = LrZeroSGD()
    w0 = model.net[0].weight.detach().clone()
    b0 = model.net[0].bias.detach().clone()
    trainer = _fit(
        trainer_kwargs, model, [DecoupledWeightDecay(0.1, mode="constant")],
        max_epochs=1, limit_train_batches=12, accumulate_grad_batches=3,
    )
    assert trainer.global_step == 4
    torch.testing.assert_close(model.net[0].weight.detach(), w0 * 0.9**4)
    assert torch.equal(model.net[0].bias.detach(), b0)  # ndim 1: excluded by default


def test_no_decay_on_amp_skipped_steps(trainer_kwargs):
    model = LrZeroSGD()
    w0 = model.net[0].weight.detach().clone()
    logger = CaptureLogger()
    _fit(
        trainer_kwargs, model, [DecoupledWeightDecay(0.1, mode="constant"), InjectInfGrad({2, 5, 6})],
        max_epochs=1, limit_train_batches=10, limit_val_batches=0, plugins=[fp16_cpu_plugin()],
        logger=logger, log_every_n_steps=1,
    )
    torch.testing.assert_close(model.net[0].weight.detach(), w0 * 0.9**7)
    # one record per decay that happened: nothing logged for the skipped batches 2, 5, 6
    assert [step for step, _ in logger.metrics["wd_effective-SGD"]] == [0, 1, 3, 4, 7, 8, 9]


def test_double_decay_is_refused_and_optimizer_value_can_be_taken_over(trainer_kwargs):
    with pytest.raises(ValueError, match="AdamW param group 0 has its own weight_decay=0.01"):
        _fit(trainer_kwargs, TinyClassifier(optimizer="adamw", weight_decay=0.01), [DecoupledWeightDecay(0.1)], max_steps=1)
    pl.seed_everything(0)
    ref = TinyClassifier(optimizer="adamw", lr=3e-3, weight_decay=0.2)
    _fit(trainer_kwargs, ref, [], max_steps=30)
    pl.seed_everything(0)
    ours = TinyClassifier(optimizer="adam", lr=3e-3, weight_decay=0.2)  # coupled in the optimizer ...
    _fit(trainer_kwargs, ours, [DecoupledWeightDecay("optimizer", exclude_1d=False)], max_steps=30)  # ... taken over
    assert (_weights(ref) - _weights(ours)).abs().max().item() <= 1e-6


def test_logs_effective_decay_and_lr_monitor_shows_lambda(trainer_kwargs):
    steps, lam = 20, 0.3
    logger = CaptureLogger()
    _fit(
        trainer_kwargs, OneCycleAdam(steps, optimizer="adam", lr=1e-3),
        [DecoupledWeightDecay(lam), LearningRateMonitor(log_weight_decay=True)],
        max_steps=steps, logger=logger, log_every_n_steps=1,
    )
    lrs = logger.values("lr-Adam")
    assert logger.values("lr-Adam-weight_decay") == [lam] * steps
    effective = logger.values("wd_effective-Adam")
    assert len(effective) == steps and len(set(effective)) > 5  # follows the one-cycle lr
    for lr, eff in zip(lrs, effective):
        assert eff == pytest.approx(lr * lam, rel=1e-12)


def test_checkpoint_resume_matches_straight_run_and_stores_zero_in_optimizer(trainer_kwargs, tmp_path):
    def make():
        pl.seed_everything(0)
        return TinyClassifier(optimizer="sgd", lr=0.05)

    straight = make()
    epochs = dict(limit_train_batches=4, limit_val_batches=0)
    _fit(trainer_kwargs, straight, [DecoupledWeightDecay(0.5, mode="lr")], max_epochs=4, **epochs)
    first = make()
    trainer = _fit(trainer_kwargs, first, [DecoupledWeightDecay(0.5, mode="lr")], max_epochs=2, **epochs)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.0  # no coupled L2 without us
    assert ckpt["callbacks"]["DecoupledWeightDecay"] == {"optimizers": [{"lambdas": [0.5], "lr_refs": [0.05]}], "steps": [8]}
    resumed = make()
    probe = WeightDecayProbe()
    callback = DecoupledWeightDecay(0.5, mode="lr")
    trainer = pl.Trainer(callbacks=[callback, probe], max_epochs=4, **epochs, **trainer_kwargs)
    trainer.fit(resumed, datamodule=RandomClassificationData(), ckpt_path=path)
    assert torch.equal(_weights(resumed), _weights(straight))
    assert probe.inside == [0.0] * 8 and trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.5


def test_unmatched_pattern_warns_once(trainer_kwargs):
    with pytest.warns(UserWarning, match="pattern 'embedding' matches no optimized parameter"):
        _fit(trainer_kwargs, TinyClassifier(), [DecoupledWeightDecay(0.1, exclude=["^net", "embedding"])], max_steps=1)


def test_exclude_by_pattern_and_predicate(trainer_kwargs):
    for exclude, kept in [(r"^net\.2\.", {"net.2.weight"}), (lambda n, p: p.shape[0] == 16, {"net.0.weight"})]:
        model = LrZeroSGD()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _fit(trainer_kwargs, model, [DecoupledWeightDecay(0.5, mode="constant", exclude=exclude)], max_steps=1)
        unchanged = {n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])}
        assert unchanged == kept | {"net.0.bias", "net.2.bias"}


@pytest.mark.parametrize("kwargs,match", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoupledWeightDecay(**kwargs)


def test_parity_with_adamw_under_pl_optim_one_cycle(trainer_kwargs):
    steps, lam = 100, 0.3

    def run(optimizer, wd, callbacks):
        pl.seed_everything(0)
        model = TinyClassifier(optimizer=optimizer, lr=1e-3, weight_decay=wd)
        _fit(trainer_kwargs, model, [OneCycle(max_lr=1e-2, beta2=0.99), *callbacks], max_steps=steps)
        return _weights(model)

    ref = run("adamw", lam, [])
    ours = run("adam", 0.0, [DecoupledWeightDecay(lam, exclude_1d=False)])
    assert (ref - ours).abs().max().item() <= 1e-6
    assert (ref - run("adam", 0.0, [])).abs().max().item() > 1e-4


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_weight_decay_scheduled_by_param_scheduler(trainer_kwargs, tmp_path, scheduler_first):
    """ParamScheduler writes group["weight_decay"] between steps; the decay applied at step t is
    the scheduled value, the optimizer sees 0, LearningRateMonitor shows the schedule, and a
    resumed run continues identically, whatever the callback order."""
    steps, schedule = 8, Linear(0.4, 0.0)

    def callbacks(*extra):
        pair = [ParamScheduler({"weight_decay": schedule}, total_steps=steps), DecoupledWeightDecay(0.4, mode="constant")]
        return [*(pair if scheduler_first else pair[::-1]), *extra]

    logger, probe = CaptureLogger(), WeightDecayProbe()
    model = LrZeroSGD()
    w0 = model.net[0].weight.detach().clone()
    epochs = dict(limit_train_batches=4, limit_val_batches=0)
    _fit(
        trainer_kwargs, model, callbacks(LearningRateMonitor("step", log_weight_decay=True), probe),
        max_epochs=2, logger=logger, log_every_n_steps=1, **epochs,
    )
    wds = [schedule(t, steps) for t in range(steps)]
    assert logger.values("lr-SGD-weight_decay") == pytest.approx(wds)
    assert logger.values("wd_effective-SGD") == pytest.approx(wds)
    assert probe.inside == [0.0] * steps
    torch.testing.assert_close(model.net[0].weight.detach(), w0 * math.prod(1 - w for w in wds))
    # stop at 4, resume to 8: same weights
    pl.seed_everything(0)
    first = LrZeroSGD()
    trainer = _fit(trainer_kwargs, first, callbacks(), max_epochs=1, **epochs)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    pl.seed_everything(0)
    resumed = LrZeroSGD()
    trainer = pl.Trainer(callbacks=callbacks(), max_epochs=2, **epochs, **trainer_kwargs)
    trainer.fit(resumed, datamodule=RandomClassificationData(), ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(_weights(resumed), _weights(model), rtol=0, atol=0)


class ManualTwoOptimizers(TinyClassifier):
    """Manual optimization (GAN-style): two SGD optimizers with lr=0, stepped by hand; the second
    has two param groups."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt_a.step()
        if batch_idx % 2 == 0:
            opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()

    def configure_optimizers(self):
        first, second = self.net[0], self.net[2]
        return (
            torch.optim.SGD(first.parameters(), lr=0.0),
            torch.optim.SGD([{"params": [second.weight]}, {"params": [second.bias]}], lr=0.0),
        )


def test_manual_optimization_several_optimizers_and_groups(trainer_kwargs):
    model = ManualTwoOptimizers()
    w_a, w_b = model.net[0].weight.detach().clone(), model.net[2].weight.detach().clone()
    logger = CaptureLogger()
    _fit(
        trainer_kwargs, model, [DecoupledWeightDecay(0.1, mode="constant")],
        max_epochs=1, limit_train_batches=6, limit_val_batches=0, logger=logger, log_every_n_steps=1,
    )
    torch.testing.assert_close(model.net[0].weight.detach(), w_a * 0.9**6)
    torch.testing.assert_close(model.net[2].weight.detach(), w_b * 0.9**3)
    assert logger.values("wd_effective-SGD") == pytest.approx([0.1] * 6)  # LearningRateMonitor's names
    assert logger.values("wd_effective-SGD-1/pg1") == pytest.approx([0.1] * 3)
    assert logger.values("wd_effective-SGD-1/pg2") == pytest.approx([0.1] * 3)  # λ of the group (bias excluded)


def test_decay_too_large_for_the_lr_fails_at_setup_without_touching_the_weights(trainer_kwargs):
    model = TinyClassifier(optimizer="sgd", lr=0.5)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"optimizer 0: decoupled decay coefficient must be in \[0, 1\].*got c = 2.5"):
        _fit(trainer_kwargs, model, [DecoupledWeightDecay(5.0)], max_steps=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
