"""ParamScheduler: any field, per-group multipliers, several optimizers / manual optimization,
LearningRateMonitor, torch-scheduler conflicts, weight decay written around other step hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger

from examples.tiny import TinyClassifier
from pl_optim.callbacks import OneCycle, ParamScheduler, StepHookCallback
from pl_optim.schedules import Constant, Cosine, Linear, one_cycle
from tests.callbacks.test_one_cycle import Probe, StopAfterEpoch, fit


class TwoGroups(TinyClassifier):
    def configure_optimizers(self):
        groups = [{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}]
        return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)


def test_any_field_with_per_group_multipliers(trainer_kwargs):
    probe = Probe(fields=("lr", "betas[0]", "betas[1]", "weight_decay"))
    sched = ParamScheduler(
        {"lr": Cosine(1e-2, 1e-4), "beta1": [Constant(0.9), Linear(0.95, 0.85)], "betas[1]": Constant(0.99),
         "weight_decay": Linear(0.1, 0.0)},
        multipliers={"lr": [0.1, 1.0], "weight_decay": [0.0, 1.0]},
    )
    fit([sched, probe], trainer_kwargs, TwoGroups(), max_steps=6)
    lr, b1, wd = Cosine(1e-2, 1e-4), Linear(0.95, 0.85), Linear(0.1, 0.0)
    assert probe.trace == [(0, 0.1 * lr(k, 6), 0.9, 0.99, 0.0, lr(k, 6), b1(k, 6), 0.99, wd(k, 6)) for k in range(6)]


def test_custom_key(trainer_kwargs):
    class Custom(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            opt.param_groups[0]["noise"] = 0.0
            return opt

    probe = Probe(fields=("noise",))
    fit([ParamScheduler({"noise": Linear(1.0, 0.0)}), probe], trainer_kwargs, Custom(), max_steps=4)
    assert probe.trace == [(0, 1.0 - k / 4) for k in range(4)]


class ManualTwoOptimizers(TinyClassifier):
    """Manual optimization: optimizer 0 steps every batch, optimizer 1 every other batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
                torch.optim.Adam(self.net[2].parameters(), lr=1e-3)]

    def training_step(self, batch, batch_idx):
        a, b = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        a.zero_grad()
        b.zero_grad()
        self.manual_backward(loss)
        a.step()
        if batch_idx % 2 == 0:
            b.step()


def test_manual_optimization_one_counter_per_optimizer(trainer_kwargs):
    probe, cb = Probe(), OneCycle(0.1)
    fit([cb, probe], trainer_kwargs, ManualTwoOptimizers(), max_epochs=1, limit_train_batches=8)
    assert cb.totals == [8, 8] and cb.steps == [8, 4]
    lr, mom = one_cycle(0.1)
    assert [row[1:] for row in probe.trace if row[0] == 0] == [(lr(k, 8), mom(k, 8)) for k in range(8)]
    assert [row[1:] for row in probe.trace if row[0] == 1] == [(lr(k, 8), mom(k, 8)) for k in range(4)]


def test_manual_optimization_max_steps_counts_all_optimizers(trainer_kwargs):
    cb = ParamScheduler({"lr": Cosine(0.1, 0.0)}, optimizers=[0])
    fit([cb], trainer_kwargs, ManualTwoOptimizers(), max_steps=9)  # global_step counts both optimizers
    assert cb.totals == [4]


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_learning_rate_monitor_logs_the_scheduled_values(trainer_kwargs):
    logger, probe = MemoryLogger(), Probe(fields=("lr", "momentum", "weight_decay"))
    callbacks = [OneCycle(0.1), ParamScheduler({"weight_decay": Cosine(1e-2, 1e-3)}), probe,
                 LearningRateMonitor(logging_interval="step", log_momentum=True, log_weight_decay=True)]
    kw = {**trainer_kwargs, "logger": logger, "log_every_n_steps": 1}
    fit(callbacks, kw, TinyClassifier(optimizer="sgd", lr=0.5), max_steps=7)
    logged = [(m["lr-SGD"], m["lr-SGD-momentum"], m["lr-SGD-weight_decay"]) for _, m in logger.rows if "lr-SGD" in m]
    assert len(logged) == 7
    assert logged == [row[1:] for row in probe.trace]
    lr, mom = one_cycle(0.1)
    assert logged[3] == (lr(3, 7), mom(3, 7), Cosine(1e-2, 1e-3)(3, 7))


class TorchStepLR(TinyClassifier):
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


def test_torch_scheduler_conflict_is_an_error(trainer_kwargs):
    with pytest.raises(ValueError, match=r"drives \['lr'\] of the optimizer that configure_optimizers also gives the torch scheduler StepLR"):
        fit([ParamScheduler({"lr": Constant(0.1)})], trainer_kwargs, TorchStepLR(), max_steps=3)


def test_torch_lr_scheduler_with_a_weight_decay_schedule_is_fine(trainer_kwargs):
    probe = Probe(fields=("weight_decay",))
    fit([ParamScheduler({"weight_decay": Linear(0.1, 0.0)}), probe], trainer_kwargs, TorchStepLR(), max_epochs=1, limit_train_batches=3)
    assert probe.trace == [(0, 0.1 - 0.1 * k / 3) for k in range(3)]


def test_two_schedulers_on_the_same_field_is_an_error(trainer_kwargs):
    with pytest.raises(ValueError, match=r"both schedule \(optimizer, field\) \[\(0, 'lr'\)\]"):
        fit([OneCycle(0.1), ParamScheduler({"lr": Constant(0.1)})], trainer_kwargs, max_steps=3)


class ZeroAroundStep(StepHookCallback):
    """Stand-in for decoupled weight decay: reads λ in the pre-hook, zeroes it during the step,
    writes the value it read back in the post-hook (the least cooperative restore)."""

    def __init__(self):
        self.seen: list[float] = []

    def before_step(self, trainer, index, optimizer):
        self._saved = optimizer.param_groups[0]["weight_decay"]
        self.seen.append(self._saved)
        optimizer.param_groups[0]["weight_decay"] = 0.0

    def after_step(self, trainer, index, optimizer):
        optimizer.param_groups[0]["weight_decay"] = self._saved


@pytest.mark.parametrize("first", ["scheduler", "zeroer"])
def test_weight_decay_schedule_survives_a_zero_restore_hook(trainer_kwargs, first):
    zeroer, sched = ZeroAroundStep(), ParamScheduler({"weight_decay": Linear(0.1, 0.0)})
    fit([sched, zeroer] if first == "scheduler" else [zeroer, sched], trainer_kwargs, max_steps=5)
    assert zeroer.seen == pytest.approx([0.1 - 0.02 * k for k in range(5)], abs=1e-15)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"schedules": {}}, r"`schedules` must be a non-empty dict field -> schedule, got \{\}"),
        ({"schedules": {"lr": 0.1}}, r"`schedules\['lr'\]` must be a schedule or a list of schedules, got 0.1"),
        ({"multipliers": [0.1, 1.0]}, r"`multipliers` must be a dict field -> per-group factors or 'initial', got \[0.1, 1.0\]"),
        ({"multipliers": {"lr": "first"}}, r"`multipliers` must be a dict .* got \{'lr': 'first'\}"),
        ({"total_steps": [10, 0]}, r"`total_steps\[1\]` must be an integer >= 1, got 0"),
        ({"total_steps": 2.5}, r"`total_steps` must be a positive int or a list of them, got 2.5"),
        ({"optimizers": "all"}, r"`optimizers` must be None, an index >= 0 or a list of distinct ones, got 'all'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParamScheduler(**{"schedules": {"lr": Constant(0.1)}, **kwargs})


@pytest.mark.parametrize(
    "sched,model,match",
    [
        (ParamScheduler({"momentum": Constant(0.9)}), TinyClassifier(optimizer="adagrad"),
         "ParamScheduler, optimizer 0: Adagrad has no param-group field 'momentum'"),
        (ParamScheduler({"lr": [Constant(0.1)] * 3}), TwoGroups(), "`lr` has 3 schedules but the optimizer has 2 param groups"),
        (ParamScheduler({"lr": Constant(0.1)}, multipliers={"lr": [1.0]}), TwoGroups(),
         r"`multipliers\['lr'\]` has 1 values but the optimizer has 2 param groups"),
        (ParamScheduler({"lr": Constant(0.1)}, total_steps=[5, 5]), TinyClassifier(), "`total_steps` has 2 values for 1 scheduled"),
    ],
)
def test_bad_setup(trainer_kwargs, sched, model, match):
    with pytest.raises(ValueError, match=match):
        fit([sched], trainer_kwargs, model, max_steps=3)


def test_two_instances_have_distinct_state_keys():
    a, b = ParamScheduler({"lr": Constant(0.1)}), ParamScheduler({"weight_decay": Constant(0.1)})
    assert a.state_key != b.state_key and OneCycle(0.1).state_key != a.state_key


def test_one_scheduler_per_optimizer(trainer_kwargs):
    a = ParamScheduler({"lr": Cosine(0.1, 0.0)}, optimizers=0)
    b = ParamScheduler({"lr": Linear(1e-3, 0.0)}, optimizers=[1])
    probe = Probe(fields=("lr",))
    fit([a, b, probe], trainer_kwargs, ManualTwoOptimizers(), max_epochs=1, limit_train_batches=4)
    assert (a.steps, b.steps) == ([4], [2]) and a.state_key != b.state_key
    assert [r[1] for r in probe.trace if r[0] == 1] == [Linear(1e-3, 0.0)(k, 4) for k in range(2)]


def test_schedules_from_the_cli(tmp_path, monkeypatch):
    from pathlib import Path

    from examples.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    schedules = ('{"lr": {"class_path": "pl_optim.schedules.Cosine", "init_args": {"start": 0.01, "end": 0.0001}},'
                 ' "weight_decay": {"class_path": "pl_optim.schedules.Constant", "init_args": {"value": 0.01}}}')
    cli = main(["fit", "--config", "examples/configs/digits_convnet.yaml", "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.callbacks+=pl_optim.callbacks.ParamScheduler", f"--trainer.callbacks.schedules={schedules}"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ParamScheduler))
    assert cb.schedules == {"lr": Cosine(0.01, 0.0001), "weight_decay": Constant(0.01)} and cb.steps == [3]
    group = cli.trainer.optimizers[0].param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (Cosine(0.01, 0.0001)(2, 3), 0.01)


def test_initial_multipliers_scale_the_configured_values_and_survive_resume(trainer_kwargs, tmp_path):
    class Discriminative(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 0.01},
                                    {"params": self.net[2].parameters(), "lr": 0.1}], lr=0.1)

    def run(**kw):
        probe = Probe(fields=("lr",))
        trainer, _ = fit([ParamScheduler({"lr": Cosine(1.0, 0.0)}, multipliers={"lr": "initial"}), probe, *kw.pop("extra", [])],
                         trainer_kwargs, Discriminative(), limit_train_batches=2, max_epochs=4, **kw)
        return trainer, probe

    _, full = run()
    c = Cosine(1.0, 0.0)
    assert full.trace == [(0, 0.01 * c(k, 8), 0.1 * c(k, 8)) for k in range(8)]
    t1, first = run(extra=[StopAfterEpoch(1)])
    t1.save_checkpoint(tmp_path / "half.ckpt")
    _, second = run(ckpt_path=str(tmp_path / "half.ckpt"))  # the groups now hold scheduled lrs
    assert first.trace + second.trace == full.trace


class UnfreezesHead(TinyClassifier):
    """Trains the first layer only, then adds the head as a new param group at batch 3 (an unfreeze)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9)

    def on_train_batch_start(self, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        if batch_idx == 3 and len(opt.param_groups) == 1:
            opt.add_param_group({"params": self.net[2].parameters(), "lr": 0.5})


@pytest.mark.parametrize("make,mult", [
    (lambda: OneCycle(0.1), 1.0),
    (lambda: ParamScheduler({"lr": Cosine(0.1, 0.001)}), 1.0),
    (lambda: ParamScheduler({"lr": Cosine(1.0, 0.01)}, multipliers={"lr": "initial"}), 5.0),  # 0.5 / 0.1
])
def test_param_groups_added_during_training_follow_the_schedule(trainer_kwargs, make, mult):
    probe = Probe(fields=("lr",))
    cb = make()
    trainer, _ = fit([cb, probe], trainer_kwargs, UnfreezesHead(), limit_train_batches=8, max_epochs=1)
    rows = [r for r in probe.trace if len(r) == 3]  # (step, group 0 lr, group 1 lr) once the head joined
    assert len(rows) >= 4
    for _, lr0, lr1 in rows:
        assert lr1 == pytest.approx(mult * lr0, rel=1e-12)
    if mult != 1.0:
        assert cb.state_dict()["initial"]["0/lr"] == pytest.approx([0.1, 0.5])


def test_param_groups_added_during_training_with_per_group_schedules_raise(trainer_kwargs):
    cb = ParamScheduler({"lr": [Cosine(0.1, 0.001)]})
    with pytest.raises(ValueError, match=r"param group\(s\) \[1\] of SGD were added after scheduling started.*`lr` was given one schedule per param group"):
        fit([cb], trainer_kwargs, UnfreezesHead(), limit_train_batches=8, max_epochs=1)
