"""pl_optim.range_test.lr_range_test: exponential sweep, smoothing, divergence stop, bit-exact restore."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pl_optim.range_test import RangeTestResult, lr_range_test, restored


def _setup(opt_cls=torch.optim.Adam):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = opt_cls([{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[3].parameters(), "lr": 1e-2}])
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def loss_fn(k):
        i = (k * 16) % 64
        return F.cross_entropy(model(x[i:i + 16] + 0.01 * torch.randn(16, 4)), y[i:i + 16])

    return model, opt, loss_fn


def _snapshot(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()},
        [dict(g) for g in opt.param_groups],
    )


def test_restore_is_bit_exact_and_in_place():
    model, opt, loss_fn = _setup()
    for k in range(3):  # build some real optimizer state first
        opt.zero_grad()
        loss_fn(k).backward()
        opt.step()
    groups_before = list(opt.param_groups)
    grad0 = model[0].weight.grad.clone()
    w, state, groups = _snapshot(model, opt)
    rng = torch.get_rng_state()
    result = lr_range_test(loss_fn, opt, [model], min_lr=1e-5, max_lr=1.0, num_steps=20)
    assert len(result.lrs) >= 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, w[k]), k  # weights and BatchNorm running stats
    assert opt.state.keys() == state.keys()
    for p in state:
        for k, v in state[p].items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v
    assert all(a is b for a, b in zip(opt.param_groups, groups_before))  # same dicts: references stay valid
    assert [dict(g) for g in opt.param_groups] == groups
    assert torch.equal(model[0].weight.grad, grad0)
    assert torch.equal(torch.get_rng_state(), rng)


def test_training_after_the_test_equals_training_without_it():
    runs = []
    for with_test in (False, True):
        torch.manual_seed(0)
        model, opt, loss_fn = _setup(torch.optim.SGD)
        if with_test:
            lr_range_test(loss_fn, opt, [model], num_steps=15)
        for k in range(5):
            opt.zero_grad()
            loss_fn(k).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_sweep_is_exponential_and_keeps_group_ratios():
    model, opt, loss_fn = _setup(torch.optim.SGD)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(1))  # suspended during the sweep
    lrs_used = []
    orig = opt.step

    def spy(*a, **k):
        lrs_used.append([g["lr"] for g in opt.param_groups])
        return orig(*a, **k)

    opt.step = spy
    result = lr_range_test(loss_fn, opt, [model], min_lr=1e-4, max_lr=1e-2, num_steps=5, diverge_threshold=1e9)
    assert result.lrs == pytest.approx([1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2], rel=1e-12)
    assert result.ratios == pytest.approx([1.0, 10.0])
    assert [r[1] / r[0] for r in lrs_used] == pytest.approx([10.0] * 5)
    assert seen == []  # hooks of other features never saw the sweep's steps
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert result.suggestions("min_div_10") == pytest.approx([result.suggestion() * 1, result.suggestion() * 10])


def test_smoothing_is_bias_corrected_ema():
    model, opt, loss_fn = _setup(torch.optim.SGD)
    r = lr_range_test(loss_fn, opt, [model], min_lr=1e-6, max_lr=1e-5, num_steps=6, smoothing=0.9)
    avg = 0.0
    for k, (raw, sm) in enumerate(zip(r.losses, r.smoothed)):
        avg = 0.9 * avg + 0.1 * raw
        assert sm == pytest.approx(avg / (1 - 0.9 ** (k + 1)), rel=1e-12)


def test_stops_at_divergence():
    model, opt, loss_fn = _setup(torch.optim.SGD)
    r = lr_range_test(loss_fn, opt, [model], min_lr=1e-3, max_lr=1e6, num_steps=100, smoothing=0.5)
    assert r.diverged and len(r.lrs) < 100
    assert not math.isfinite(r.smoothed[-1]) or r.smoothed[-1] > 4.0 * min(r.smoothed[:-1])


def test_suggestions_on_a_known_curve(tmp_path):
    lrs = [10 ** (-5 + k * 0.5) for k in range(10)]
    smoothed = [2.0, 1.99, 1.9, 1.5, 0.9, 0.6, 0.5, 0.55, 1.5, 3.0]
    r = RangeTestResult(lrs=lrs, losses=smoothed, smoothed=smoothed, ratios=[1.0, 0.5])
    assert r.suggestion("min_div_10") == pytest.approx(lrs[6] / 10)
    assert r.suggestion("steepest") == pytest.approx(lrs[3])  # (0.9 - 1.9) over one decade
    assert r.suggestions("steepest") == pytest.approx([lrs[3], lrs[3] / 2])
    png = r.plot(tmp_path / "sub" / "lr.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="`suggestion` must be one of"):
        r.suggestion("valley")
    with pytest.raises(ValueError, match="measured 2 finite losses"):
        RangeTestResult(lrs=[1, 2], losses=[1, 2], smoothed=[1, 2]).suggestion()


def test_steepest_ignores_the_warming_up_start():
    lrs = [10 ** (-7 + k * 0.25) for k in range(30)]
    smoothed = [3.0, 1.0] + [2.9 - 0.01 * k for k in range(18)] + [2.0, 1.2, 0.8, 0.7, 0.65, 0.7, 1.0, 2.0, 4.0, 9.0]
    r = RangeTestResult(lrs=lrs, losses=smoothed, smoothed=smoothed)
    assert r.suggestion("steepest") == pytest.approx(lrs[20])  # not lrs[1], the artefact at the start
    assert r.suggestion("min_div_10") == pytest.approx(lrs[24] / 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"min_lr": 0}, r"`min_lr` must be a positive finite number, got 0"),
        ({"max_lr": 1e-8}, r"`max_lr` must be > `min_lr` \(1e-07\), got 1e-08"),
        ({"num_steps": 2}, r"`num_steps` must be an integer >= 3, got 2"),
        ({"smoothing": 1.0}, r"`smoothing` must be in \[0, 1\), got 1.0"),
        ({"diverge_threshold": 1.0}, r"`diverge_threshold` must be > 1, got 1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    model, opt, loss_fn = _setup()
    with pytest.raises(ValueError, match=match):
        lr_range_test(loss_fn, opt, [model], **kwargs)


def test_restored_on_exception():
    model, opt, _ = _setup(torch.optim.SGD)
    w = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError), restored([model], opt):
        model[0].weight.data.add_(1.0)
        raise RuntimeError
    assert torch.equal(model[0].weight, w)


def test_tensor_lr_is_swept_and_restored_in_place():
    model, _, loss_fn = _setup()
    lr = torch.tensor(1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_obj = opt.param_groups[0]["lr"]
    r = lr_range_test(loss_fn, opt, [model], min_lr=1e-5, max_lr=1e-2, num_steps=5)
    assert len(r.lrs) == 5
    assert opt.param_groups[0]["lr"] is lr_obj and lr_obj.item() == pytest.approx(1e-3)


_LRS = [10 ** (-7 + k) for k in range(9)]  # 1e-7 ... 10, one decade a step


@pytest.mark.parametrize(
    "smoothed,diverged,method,match",
    [
        # lowest at the very start: min/10 is below min_lr
        ([1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5, 5.0], True, "min_div_10", r"below the start of the sweep \(`min_lr`=1e-07\).*Lower `min_lr`, or raise `num_steps`"),
        # lowest at the second point: min/10 is exactly min_lr
        ([1.0, 0.9, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5, 5.0], True, "min_div_10", r"point 2 of 9"),
        # steepest fall at the first candidate point
        ([2.0, 1.0, 0.9, 0.85, 0.84, 0.83, 0.9, 2.0, 9.0], True, "steepest", r"suggested lr 1e-06 \(steepest\) sits at or below the start"),
        # still falling at max_lr and no divergence
        ([2.0, 1.9, 1.8, 1.6, 1.3, 1.0, 0.8, 0.6, 0.5], False, "min_div_10", r"still falling at the last lr 10 \(`max_lr`\).*Raise `max_lr`"),
        ([2.0, 1.9, 1.8, 1.6, 1.3, 1.0, 0.8, 0.6, 0.5], False, "steepest", r"Raise `max_lr`"),
        # a proper valley: no warning
        ([2.0, 1.99, 1.9, 1.5, 0.9, 0.6, 0.5, 1.5, 3.0], True, "min_div_10", None),
        ([2.0, 1.99, 1.9, 1.5, 0.9, 0.6, 0.5, 1.5, 3.0], True, "steepest", None),
        # too few points to suggest anything: suggestion() raises, warning() stays quiet
        ([1.0, 2.0], True, "min_div_10", None),
    ],
)
def test_warning_at_the_ends_of_the_sweep(smoothed, diverged, method, match):
    lrs = _LRS[: len(smoothed)]
    r = RangeTestResult(lrs=lrs, losses=smoothed, smoothed=smoothed, diverged=diverged)
    message = r.warning(method)
    if match is None:
        assert message is None
    else:
        assert message is not None and re.search(match, message), message


def test_table_of_the_sweep():
    r = RangeTestResult(lrs=[1e-3, 1e-2, 1e-1], losses=[2.0, 1.0, 9.0], smoothed=[2.0, 1.5, 4.0], diverged=True)
    table = r.table()
    assert table.to_dicts() == [
        {"step": 0, "lr": 1e-3, "loss": 2.0, "smoothed": 2.0},
        {"step": 1, "lr": 1e-2, "loss": 1.0, "smoothed": 1.5},
        {"step": 2, "lr": 1e-1, "loss": 9.0, "smoothed": 4.0},
    ]
    text = str(table)
    assert text.splitlines()[0] == "LR range test: 3 steps, diverged"
    assert text.splitlines()[-1].split() == ["2", "0.1", "9", "4"]
