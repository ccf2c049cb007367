"""pl_optim.schedules: parity with torch.optim.lr_scheduler, composition, the param-group writer."""

from __future__ import annotations

import math

import pytest
import torch

from pl_optim.param_groups import GroupWriter, read_field, resolve_field
from pl_optim.schedules import (
    Combined,
    Constant,
    Cosine,
    Exponential,
    Linear,
    MultiStep,
    Polynomial,
    StepDecay,
    WarmRestarts,
    Warmup,
    one_cycle,
)

S = torch.optim.lr_scheduler


def _groups(n=1, opt=torch.optim.SGD, **kw):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)]
    kw.setdefault("lr", 1.0)
    return opt([{"params": [p]} for p in params], **kw)


def _torch_trace(make, steps, lr=1.0, opt_cls=torch.optim.SGD, field="lr", **kw):
    opt = _groups(opt=opt_cls, lr=lr, **kw)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(float(opt.param_groups[0][field]) if field != "beta1" else opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "ours,make",
    [
        (Linear(0.5, 1.0), lambda o: S.LinearLR(o, 0.5, 1.0, total_iters=20)),
        (Cosine(1.0, 0.01), lambda o: S.CosineAnnealingLR(o, T_max=20, eta_min=0.01)),
        (Exponential(1.0, 0.9**20), lambda o: S.ExponentialLR(o, 0.9)),
        (Polynomial(1.0, 0.0, 2.0), lambda o: S.PolynomialLR(o, total_iters=20, power=2.0)),
        (StepDecay(1.0, 6, 0.5), lambda o: S.StepLR(o, 6, 0.5)),
        (StepDecay(1.0, 0.25, 0.5), lambda o: S.StepLR(o, 5, 0.5)),
        (MultiStep(1.0, [3, 11, 12], 0.3), lambda o: S.MultiStepLR(o, [3, 11, 12], 0.3)),
        (MultiStep(1.0, [0.5, 0.75], 0.1), lambda o: S.MultiStepLR(o, [10, 15], 0.1)),
        (WarmRestarts(1.0, 0.1, 4, 1), lambda o: S.CosineAnnealingWarmRestarts(o, 4, 1, 0.1)),
        (WarmRestarts(1.0, 0.0, 3, 2), lambda o: S.CosineAnnealingWarmRestarts(o, 3, 2, 0.0)),
        (Constant(1.0), lambda o: S.ConstantLR(o, factor=1.0)),
    ],
)
def test_schedules_equal_torch_schedulers(ours, make):
    total = 20
    expected = _torch_trace(make, 2 * total if isinstance(ours, WarmRestarts) else total)
    got = [ours(k, total) for k in range(len(expected))]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_then_cosine_equals_torch_sequential():
    total, warm = 20, 5
    ours = Warmup(Cosine(1.0, 0.0), warm, start=0.1)
    expected = _torch_trace(
        lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, warm), S.CosineAnnealingLR(o, total - warm)], [warm]), total
    )
    assert [ours(k, total) for k in range(total)] == pytest.approx(expected, rel=1e-12)


def test_combined_phases_fastai_convention():
    s = Combined([0.25, 0.75], [Linear(0.0, 1.0), Cosine(1.0, 0.0)])
    assert s(0, 100) == 0.0
    assert s(12.5, 100) == pytest.approx(0.5)
    assert s(25, 100) == 1.0  # second phase starts at its own step 0
    assert s(25 + 37.5, 100) == pytest.approx(0.5)
    assert s(100, 100) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_one_cycle_equals_torch(three_phase, strategy, opt_cls):
    total, max_lrs = 97, [0.1, 0.4]
    kw = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = _groups(2, opt_cls, **kw)
    sched = S.OneCycleLR(opt, max_lrs, total_steps=total, anneal_strategy=strategy, three_phase=three_phase)
    ours = [one_cycle(m, anneal_strategy=strategy, three_phase=three_phase) for m in max_lrs]
    mom_key = "momentum" if opt_cls is torch.optim.SGD else "betas[0]"
    for k in range(total):
        for g, (lr, mom) in zip(opt.param_groups, ours):
            assert abs(g["lr"] - lr(k, total)) <= 1e-12
            assert abs(read_field(g, mom_key) - mom(k, total)) <= 1e-12
        opt.step()
        if k < total - 1:
            sched.step()


def test_one_cycle_shape():
    lr, mom = one_cycle(1.0, pct_start=0.25, div_factor=10, final_div_factor=100)
    assert lr(0, 100) == pytest.approx(0.1) and mom(0, 100) == pytest.approx(0.95)
    peak = max(range(100), key=lambda k: lr(k, 100))
    assert peak == 24 and mom(peak, 100) == pytest.approx(0.85)
    assert lr(99, 100) == pytest.approx(1e-3) and mom(99, 100) == pytest.approx(0.95)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_lr": 0}, r"`max_lr` must be > 0, got 0"),
        ({"max_lr": -1.0}, r"`max_lr` must be > 0, got -1.0"),
        ({"pct_start": 1.5}, r"`pct_start` must be in \(0, 1\), got 1.5"),
        ({"pct_start": 0}, r"`pct_start` must be in \(0, 1\), got 0"),
        ({"anneal_strategy": "exp"}, r"`anneal_strategy` must be one of \('cos', 'linear'\), got 'exp'"),
        ({"div_factor": 0}, r"`div_factor` must be > 0, got 0"),
        ({"final_div_factor": -2}, r"`final_div_factor` must be > 0, got -2"),
        ({"base_momentum": 1.0}, r"`base_momentum` must be in \[0, 1\), got 1.0"),
        ({"max_momentum": -0.1}, r"`max_momentum` must be in \[0, 1\), got -0.1"),
        ({"max_lr": float("nan")}, r"`max_lr` must be a finite number, got nan"),
    ],
)
def test_one_cycle_bad_input(kwargs, match):
    kwargs = {"max_lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        one_cycle(**kwargs)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Exponential(0.0, 1.0), r"`start` must be > 0, got 0.0"),
        (lambda: StepDecay(1.0, 0), r"`step_size` must be >= 1 when given in steps, got 0"),
        (lambda: StepDecay(1.0, 1.5), r"`step_size` must be in \(0, 1\] when given as a fraction of the run, got 1.5"),
        (lambda: MultiStep(1.0, [5, 3]), r"`milestones` must be increasing, got \[5, 3\]"),
        (lambda: MultiStep(1.0, []), r"`milestones` must be a non-empty list"),
        (lambda: WarmRestarts(1.0, 0.0, 4, 0), r"`mult` must be an integer >= 1, got 0"),
        (lambda: Combined([0.5, 0.6], [Constant(1), Constant(2)]), r"`pcts` must be positive and sum to 1, got \[0.5, 0.6\]"),
        (lambda: Combined([1.0], []), r"same non-zero length, got 1 and 0"),
        (lambda: Warmup("cos", 3), r"`schedule` must be a schedule"),
        (lambda: Linear("a", 1.0), r"`start` must be a finite number, got 'a'"),
    ],
)
def test_schedule_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedules_are_pure_and_comparable():
    s = Cosine(1.0, 0.0)
    assert [s(k, 10) for k in range(10)] == [s(k, 10) for k in range(10)]
    assert s == Cosine(1.0, 0.0) and s != Cosine(1.0, 0.1) and "Cosine(start=1.0, end=0.0)" in repr(s)


def test_resolve_field():
    sgd, adam, adagrad = _groups(opt=torch.optim.SGD, momentum=0.9), _groups(opt=torch.optim.Adam), _groups(opt=torch.optim.Adagrad)
    assert resolve_field(sgd, "momentum") == "momentum"
    assert resolve_field(adam, "momentum") == "betas[0]"
    assert resolve_field(adam, "beta2") == "betas[1]"
    assert resolve_field(adagrad, "weight_decay") == "weight_decay"
    with pytest.raises(ValueError, match="Adagrad has no param-group field 'momentum'"):
        resolve_field(adagrad, "momentum")
    with pytest.raises(ValueError, match="no param-group field 'my_key'"):
        resolve_field(sgd, "my_key")


def test_group_writer_fields_multipliers_and_custom_keys():
    opt = _groups(3, torch.optim.AdamW)
    opt.param_groups[1]["my_key"] = 0.0
    for g in opt.param_groups:
        g.setdefault("my_key", 0.0)
    w = GroupWriter(
        opt,
        {"lr": Linear(1.0, 0.0), "beta1": Constant(0.8), "beta2": Constant(0.99), "weight_decay": Cosine(0.1, 0.0),
         "my_key": [Constant(1.0), Constant(2.0), Constant(3.0)]},
        {"lr": [0.01, 0.1, 1.0]},
    )
    w.apply(5, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05, 0.5])
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    assert all(g["weight_decay"] == pytest.approx(0.05) for g in opt.param_groups)
    assert [g["my_key"] for g in opt.param_groups] == [1.0, 2.0, 3.0]
    assert w.values(0, 10)[:3] == pytest.approx([0.01, 0.1, 1.0])


@pytest.mark.parametrize(
    "schedules,multipliers,match",
    [
        ({"lr": [Constant(1.0)]}, None, "`lr` has 1 schedules but the optimizer has 2 param groups"),
        ({"lr": Constant(1.0)}, {"lr": [1.0]}, r"`multipliers\['lr'\]` has 1 values but the optimizer has 2 param groups"),
        ({"lr": Constant(1.0)}, {"momentum": [1.0, 1.0]}, r"`multipliers` names fields without a schedule: \['momentum'\]"),
        ({"lr": Constant(1.0)}, {"lr": [1.0, math.inf]}, r"`multipliers\['lr'\]` must be a finite number, got inf"),
    ],
)
def test_group_writer_bad_input(schedules, multipliers, match):
    with pytest.raises(ValueError, match=match):
        GroupWriter(_groups(2), schedules, multipliers)


def test_group_writer_initial_multipliers():
    opt = _groups(2, torch.optim.SGD, momentum=0.9)
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.01, 0.1
    w = GroupWriter(opt, {"lr": Linear(1.0, 0.0)}, {"lr": "initial"})
    assert w.multipliers == {"lr": [0.01, 0.1]}
    w.apply(5, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])


def test_group_writer_keeps_tensor_lrs_tensors():
    p = torch.nn.Parameter(torch.zeros(2))
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam([p], lr=lr)
    GroupWriter(opt, {"lr": Constant(0.05)}).apply(0, 10)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)
