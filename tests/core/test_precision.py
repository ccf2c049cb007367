"""pl_optim.precision: stochastic rounding, compensated bf16 updates for any optimizer, skips, memory."""

from __future__ import annotations

import copy

import pytest
import torch

from pl_optim.precision import (
    STATE_KEY,
    CompensatedUpdate,
    guarded_step,
    held_bytes,
    kahan_split,
    nonfinite_gradients,
    stochastic_round,
)
from pl_optim.steps import StepLedger
from pl_optim.weight_decay import DecoupledDecay


class HandWrittenSignSGD(torch.optim.Optimizer):
    """A third-party optimizer (not from torch): sign of a momentum buffer, lazily created state."""

    def __init__(self, params, lr=1e-3, beta=0.9):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["buf"] = torch.zeros_like(p)
                state["buf"].mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(state["buf"].sign(), alpha=-group["lr"])


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-4),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-4, momentum=0.5),
    "third-party": lambda ps: HandWrittenSignSGD(ps, lr=1e-4),
}


def _train(opt_name, dtype, compensation=None, steps=400, seed=0):
    """Every update is below half a bf16 ulp of w (in [1, 2)); their sum is several ulps.
    Returns how far w moved (effective value: Kahan's hi + lo)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter((1.0 + torch.rand(256, generator=g)).to(dtype))
    w0 = w.detach().float().clone()
    opt = OPTIMIZERS[opt_name]([w])
    if compensation is not None:
        CompensatedUpdate(opt, compensation)
    for _ in range(steps):
        w.grad = (torch.randn(256, generator=g) + 0.5).to(dtype)
        opt.step()
    lo = opt.state[w].get(STATE_KEY)
    return w.detach().float() + (0 if lo is None else lo.float()) - w0


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_small_updates_survive_with_compensation_and_stall_without(opt_name):
    ref = _train(opt_name, torch.float32)
    moved = ref.abs().mean()
    plain = _train(opt_name, torch.bfloat16)  # bf16-true: the updates are below half an ulp
    none = _train(opt_name, torch.bfloat16, "none")
    kahan = _train(opt_name, torch.bfloat16, "kahan")
    assert (kahan - ref).abs().mean() < 0.2 * moved  # element by element
    stochastic = _train(opt_name, torch.bfloat16, "stochastic")
    assert (stochastic.mean() - ref.mean()).abs() < 0.1 * moved  # unbiased: right on average
    assert (plain - ref).abs().mean() > 0.5 * moved
    assert (none - ref).abs().mean() > 0.5 * moved


def test_stochastic_round_is_unbiased_and_picks_neighbours():
    x = torch.full((20000,), 1.0 + 2**-9)  # a quarter of the way between bf16 1.0 and 1.0078125
    r = stochastic_round(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - x[0].item()) < 2e-4
    exact = torch.tensor([0.0, -2.5, 3.0, float("inf")])
    assert torch.equal(stochastic_round(exact).float(), exact)
    neg = stochastic_round(-x, torch.Generator().manual_seed(0)).float()
    assert abs(neg.mean().item() + x[0].item()) < 2e-4
    with pytest.raises(TypeError, match="float32"):
        stochastic_round(torch.ones(2, dtype=torch.float16))


def test_kahan_split_carries_the_rounding_error():
    x = torch.tensor([1.0 + 2**-12, 3.14159265])
    hi, lo = kahan_split(x)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert torch.allclose(hi.float() + lo.float(), x, rtol=2**-16, atol=0)


def test_state_is_bf16_and_holds_the_compensation_buffer():
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.ones(2))  # a float32 parameter is stepped unchanged
    opt = torch.optim.Adam([w, b], lr=1e-3)
    CompensatedUpdate(opt, "kahan")
    for _ in range(3):
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
    assert w.dtype == w.grad.dtype == torch.bfloat16 and b.dtype == torch.float32
    assert {k: v.dtype for k, v in opt.state[w].items()} == {
        "step": torch.float32, "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16, STATE_KEY: torch.bfloat16
    }
    assert opt.state[b]["exp_avg"].dtype == torch.float32 and STATE_KEY not in opt.state[b]


@pytest.mark.parametrize("compensation", ["kahan", "stochastic"])
def test_resume_from_state_dicts_is_exact(compensation):
    def make():
        w = torch.nn.Parameter(torch.linspace(1, 2, 64).to(torch.bfloat16))
        opt = torch.optim.AdamW([w], lr=1e-4)
        return w, opt, CompensatedUpdate(opt, compensation, seed=3)

    def run(w, opt, steps, start):
        for k in range(start, start + steps):
            w.grad = torch.sin(torch.arange(64.0) + k).to(torch.bfloat16)
            opt.step()

    w, opt, comp = make()
    run(w, opt, 10, 0)
    straight = w.detach().clone()
    w2, opt2, comp2 = make()
    run(w2, opt2, 4, 0)
    saved = copy.deepcopy((w2.detach(), opt2.state_dict(), comp2.state_dict()))
    w3, opt3, comp3 = make()
    w3.data.copy_(saved[0])
    opt3.load_state_dict(saved[1])
    comp3.load_state_dict(saved[2])
    run(w3, opt3, 6, 4)
    assert torch.equal(w3.detach(), straight)


def test_decoupled_decay_acts_on_the_float32_view():
    def shrink(compensation):
        w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))  # 2-D: decayed by default
        opt = torch.optim.SGD([w], lr=1e-3)
        if compensation:
            CompensatedUpdate(opt, compensation)  # first subscriber
        DecoupledDecay(opt, weight_decay=0.1).attach()  # lr*wd = 1e-4 << bf16 ulp(1)/2
        for _ in range(100):
            w.grad = torch.zeros_like(w)
            opt.step()
        lo = opt.state[w].get(STATE_KEY)
        return 1 - (w.float() + (0 if lo is None else lo.float())).mean().item()  # Kahan: hi + lo

    assert shrink(None) == 0.0  # the OneTrainer#996 stall
    assert shrink("kahan") == pytest.approx(1 - (1 - 1e-4) ** 100, rel=0.02)


def test_decay_exclude_names_still_apply_inside_the_compensated_step():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    CompensatedUpdate(opt, "kahan")
    DecoupledDecay(opt, weight_decay=0.5, exclude="1.weight", named_parameters=model.named_parameters()).attach()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(20):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert model[1].weight.dtype == torch.bfloat16
    assert torch.equal(model[1].weight.detach(), before[2])  # excluded by name: untouched
    assert not torch.equal(model[0].weight.detach(), before[0])  # decayed (lr*wd = 5e-4 per step, compensated)


def test_nonfinite_gradients_skip_and_report():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = torch.optim.SGD([w], lr=0.1)
    CompensatedUpdate(opt, "kahan")
    w.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.bfloat16)
    assert nonfinite_gradients(opt)
    assert guarded_step(opt) is False
    assert torch.equal(w.detach(), torch.ones(4, dtype=torch.bfloat16))
    ledger = StepLedger.of(opt)
    assert (ledger.steps, ledger.skipped, ledger.last_skipped) == (0, 1, True)
    w.grad = torch.ones(4, dtype=torch.bfloat16)
    assert guarded_step(opt) is True and ledger.steps == 1


@pytest.mark.parametrize("compensation,expected", [("kahan", 10.0), ("stochastic", 8.0), ("none", 8.0)])
def test_adam_bytes_per_parameter(compensation, expected):
    model = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    CompensatedUpdate(opt, compensation)
    model(torch.randn(4, 64, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    held = held_bytes([opt])
    assert held["bytes_per_param"] == pytest.approx(expected, abs=0.01)  # +4 bytes of `step` per tensor


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(compensation="kahn"), ValueError, r"`compensation` must be one of \('kahan', 'stochastic', 'none'\), got 'kahn'"),
        (dict(seed=-1), ValueError, r"`seed` must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(error, match=match):
        CompensatedUpdate(opt, **kwargs)


def test_lbfgs_is_refused():
    with pytest.raises(ValueError, match="does not support torch.optim.LBFGS"):
        CompensatedUpdate(torch.optim.LBFGS([torch.nn.Parameter(torch.ones(1))]))
