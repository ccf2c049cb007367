"""Plateau: step-for-step parity with torch's ReduceLROnPlateau, resumption, bad arguments."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pl_optim.plateau import Plateau

NAN = math.nan

# (kwargs, metric sequence): threshold modes, min/max, cooldown, patience 0, eps, NaN, min_value.
CASES = [
    (dict(), [1.0] * 30),
    (dict(patience=2, factor=0.5), [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8]),
    (dict(patience=0), [3.0, 2.0, 2.0, 2.5, 1.0, 1.0, 1.0]),
    (dict(patience=1, mode="max"), [0.1, 0.2, 0.2, 0.2, 0.3, 0.1, 0.1, 0.1]),
    (dict(patience=1, threshold=0.1, threshold_mode="rel"), [1.0, 0.95, 0.85, 0.84, 0.83, 0.70, 0.69, 0.68]),
    (dict(patience=1, threshold=0.1, threshold_mode="abs"), [1.0, 0.95, 0.85, 0.84, 0.83, 0.70, 0.69, 0.68]),
    (dict(patience=1, threshold=0.1, threshold_mode="abs", mode="max"), [0.0, 0.05, 0.2, 0.25, 0.26, 0.5, 0.5]),
    (dict(patience=1, threshold=0.0), [1.0, 1.0, 1.0, 0.99999, 1.0, 1.0]),
    (dict(patience=1, cooldown=2), [1.0] * 15),
    (dict(patience=0, cooldown=1, factor=0.5), [5.0, 6.0, 4.0, 7.0, 7.0, 3.0, 8.0, 8.0, 8.0]),
    (dict(patience=1, min_value=0.02, factor=0.5), [1.0] * 20),
    (dict(patience=0, eps=0.05, initial=0.1, factor=0.5), [1.0] * 6),
    (dict(patience=1), [NAN, NAN, 1.0, NAN, NAN, NAN, 0.5, 0.5, 0.5]),
    (dict(patience=1, mode="max"), [NAN, 1.0, NAN, NAN, 2.0, math.inf, math.inf]),
    (dict(patience=1), [-1.0, -1.0, -2.0, -2.0, -2.0]),  # negative metrics, relative threshold
]


def torch_trace(kwargs: dict, metrics: list[float]) -> list[float]:
    kw = dict(kwargs)
    lr = kw.pop("initial", 1.0)
    if "min_value" in kw:
        kw["min_lr"] = kw.pop("min_value")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    out = []
    for m in metrics:
        sched.step(m)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("kwargs,metrics", CASES)
def test_equals_torch_reduce_lr_on_plateau(kwargs, metrics):
    p = Plateau(**kwargs)
    assert [p.update(m) for m in metrics] == torch_trace(kwargs, metrics)


@pytest.mark.parametrize("seed", range(20))
def test_equals_torch_on_random_sequences(seed):
    rng = random.Random(seed)
    kwargs = dict(
        mode=rng.choice(["min", "max"]), factor=rng.choice([0.1, 0.5, 0.9]), patience=rng.randint(0, 4),
        threshold=rng.choice([0.0, 1e-4, 0.05]), threshold_mode=rng.choice(["rel", "abs"]),
        cooldown=rng.randint(0, 3), min_value=rng.choice([0.0, 1e-3]), initial=rng.choice([1.0, 0.1, 3e-4]),
    )
    walk, metrics = 1.0, []
    for _ in range(60):
        walk += rng.gauss(0, 0.05) - 0.005
        metrics.append(NAN if rng.random() < 0.05 else round(walk, rng.choice([1, 2, 6])))
    p = Plateau(**kwargs)
    assert [p.update(m) for m in metrics] == torch_trace(kwargs, metrics)


def test_tensor_metric_and_schedule_call():
    p = Plateau(initial=0.3, patience=0, factor=0.5)
    p.update(torch.tensor(1.0))
    assert p.update(torch.tensor(2.0)) == 0.15
    assert p(0, 100) == p(99, 100) == 0.15  # a schedule that ignores the step


def test_resume_continues_exactly():
    metrics = [1.0, 0.9, 0.95, 0.97, 0.96, 0.99, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    kw = dict(patience=1, cooldown=1, factor=0.5, initial=0.2)
    straight = Plateau(**kw)
    full = [straight.update(m) for m in metrics]
    first = Plateau(**kw)
    head = [first.update(m) for m in metrics[:5]]
    state = first.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    resumed = Plateau(**kw)
    resumed.load_state_dict(state)
    assert head + [resumed.update(m) for m in metrics[5:]] == full
    resumed.reset()
    assert resumed.value == 0.2 and resumed.best == math.inf and resumed.num_bad_epochs == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(factor=1.0), r"`factor` must be in \(0, 1\), got 1.0"),
        (dict(factor=0.0), r"`factor` must be in \(0, 1\), got 0.0"),
        (dict(mode="minimum"), r"`mode` must be one of \('min', 'max'\), got 'minimum'"),
        (dict(threshold=-0.1), r"`threshold` must be a finite number >= 0, got -0.1"),
        (dict(threshold_mode="relative"), r"`threshold_mode` must be one of .*got 'relative'"),
        (dict(patience=-1), r"`patience` must be an integer >= 0, got -1"),
        (dict(patience=1.5), r"`patience` must be an integer >= 0, got 1.5"),
        (dict(cooldown=-2), r"`cooldown` must be an integer >= 0, got -2"),
        (dict(eps=-1e-9), r"`eps` must be a finite number >= 0, got -1e-09"),
        (dict(initial=math.nan), r"`initial` must be a finite number, got nan"),
        (dict(min_value=math.inf), r"`min_value` must be a finite number, got inf"),
        (dict(monitor=""), r"`monitor` must be a non-empty metric name, got ''"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Plateau(**kwargs)
