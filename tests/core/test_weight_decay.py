"""Decoupled weight decay core: modes, foreach vs loop, parity with torch AdamW and an SGDW
reference, exclusion, double-decay guard, composition with another writer of weight_decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pl_optim import DecoupledDecay, StepHooks, apply_weight_decay
from pl_optim.steps import StepLedger
from pl_optim.weight_decay import compile_exclude, decay_coefficient, unmatched_patterns


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, scheduler=None) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "mode,wd,lr,lr_ref,expected",
    [
        ("lr", 0.1, 0.01, None, 1e-3),
        ("lr_ratio", 0.1, 0.01, 0.02, 0.05),
        ("constant", 0.1, 0.01, None, 0.1),
        ("l2", 0.1, 0.01, None, 0.1),
        ("lr", 0.0, 0.5, None, 0.0),
    ],
)
def test_decay_coefficient_table(mode, wd, lr, lr_ref, expected):
    assert decay_coefficient(mode, wd, lr, lr_ref) == pytest.approx(expected, rel=1e-12)


def test_decay_coefficient_refuses_weight_flip_and_missing_lr_ref():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*c = 2.0"):
        decay_coefficient("lr", 2.0, 1.0)
    with pytest.raises(ValueError, match="needs `lr_ref` > 0, got None"):
        decay_coefficient("lr_ratio", 0.1, 0.01, None)
    assert decay_coefficient("l2", 5.0, 1.0) == 5.0  # a gradient term, no [0, 1] limit


@pytest.mark.parametrize("mode", ["lr", "lr_ratio", "constant", "l2"])
def test_foreach_equals_loop_reference(mode):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 4), (4,)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float16]
    a = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    for t in a:
        t.grad = torch.randn(t.shape, generator=g).to(t.dtype)
    a[1].grad = None  # no gradient: must stay untouched
    b = [t.clone() for t in a]
    for s, t in zip(a, b):
        t.grad = None if s.grad is None else s.grad.clone()
    c = decay_coefficient(mode, 0.3, 0.1, 0.2)
    apply_weight_decay(a, c, mode, foreach=True)
    apply_weight_decay(b, c, mode, foreach=False)
    for s, t in zip(a, b):
        # fp32/fp64 bit-equal; fp16: foreach computes in fp32 "opmath", so allow fp16 rounding
        exact = s.dtype != torch.float16
        check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=1e-3, atol=0))
        assert check(s, t)
        assert (s.grad is None) == (t.grad is None) and (s.grad is None or check(s.grad, t.grad))
    g = torch.Generator().manual_seed(0)  # the same draws again: the values before the decay
    originals = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    assert torch.equal(a[1], originals[1])  # no grad: untouched
    for i in (0, 2):  # the formula itself, on the fp32 tensors that had a gradient
        if mode == "l2":
            assert torch.equal(a[i], originals[i]) and torch.allclose(a[i].grad, grads[i] + c * originals[i])
        else:
            assert torch.allclose(a[i], originals[i] * (1 - c)) and torch.equal(a[i].grad, grads[i])
        assert c > 0 and not torch.equal(a[i], originals[i]) or mode == "l2"


def test_apply_modes_math():
    p = torch.full((3,), 2.0)
    p.grad = torch.ones(3)
    apply_weight_decay([p], 0.25, "lr")
    assert torch.equal(p, torch.full((3,), 1.5))
    apply_weight_decay([p], 0.5, "l2")
    assert torch.equal(p.grad, torch.full((3,), 1.75)) and torch.equal(p, torch.full((3,), 1.5))


def _adamw_pair(lr: float, wd: float, foreach: bool):
    torch.manual_seed(0)
    a = _model()
    b = _model()
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(a.parameters(), lr=lr, weight_decay=wd, foreach=foreach)
    opt = torch.optim.Adam(b.parameters(), lr=lr, weight_decay=0.0, foreach=foreach)
    decay = DecoupledDecay(opt, wd, mode="lr", exclude_1d=False)
    decay.attach()
    return a, ref, b, opt, decay


@pytest.mark.parametrize("foreach", [True, False])
def test_parity_with_adamw_constant_lr(foreach):
    a, ref, b, opt, decay = _adamw_pair(3e-3, 0.3, foreach)
    batches = _batches(120)
    _train(a, ref, batches)
    _train(b, opt, batches)
    assert _max_diff(a, b) <= 1e-6
    plain = _model()
    plain.load_state_dict(_adamw_pair(3e-3, 0.3, foreach)[0].state_dict())
    _train(plain, torch.optim.Adam(plain.parameters(), lr=3e-3), batches)
    assert _max_diff(a, plain) > 1e-3  # the decay matters at this scale
    assert opt.param_groups[0]["weight_decay"] == 0.3  # λ visible between steps


def test_parity_with_adamw_under_one_cycle():
    a, ref, b, opt, decay = _adamw_pair(3e-3, 0.3, True)
    batches = _batches(120)
    sched_a = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=1e-2, total_steps=120)
    sched_b = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=120)
    _train(a, ref, batches, sched_a)
    _train(b, opt, batches, sched_b)
    assert _max_diff(a, b) <= 1e-6


def test_l2_mode_equals_optimizer_own_weight_decay():
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    ref = torch.optim.Adam(a.parameters(), lr=1e-3, weight_decay=1e-2)
    opt = torch.optim.Adam(b.parameters(), lr=1e-3)
    DecoupledDecay(opt, 1e-2, mode="l2", exclude_1d=False).attach()
    batches = _batches(100)
    _train(a, ref, batches)
    _train(b, opt, batches)
    assert _max_diff(a, b) <= 1e-6


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_handwritten_sgdw(nesterov):
    """SGDW (Loshchilov & Hutter, Alg. 1): θ ← θ − lr·λ·θ − lr·(momentum buffer)."""
    lr, wd, mom = 0.05, 0.1, 0.9
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    opt = torch.optim.SGD(a.parameters(), lr=lr, momentum=mom, nesterov=nesterov)
    decay = DecoupledDecay(opt, wd, named_parameters=a.named_parameters())
    decay.attach()
    batches = _batches(100)
    _train(a, opt, batches)
    bufs = {}
    for x, y in batches:
        b.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        with torch.no_grad():
            for p in b.parameters():
                if p.ndim > 1:  # default exclusion of biases / norm parameters
                    p.mul_(1 - lr * wd)
                buf = bufs[p] = p.grad.clone() if p not in bufs else bufs[p].mul_(mom).add_(p.grad)
                p.sub_(lr * (p.grad + mom * buf if nesterov else buf))
    assert _max_diff(a, b) <= 1e-6


@pytest.mark.parametrize("opt_cls", [torch.optim.RMSprop, torch.optim.Adagrad])
def test_any_optimizer_gets_exactly_the_decay(opt_cls):
    """With lr=0 the optimizer moves nothing, so only the decay shows: w·(1 − λ)^steps."""
    p = nn.Parameter(torch.full((2, 2), 3.0))
    opt = opt_cls([p], lr=0.0)
    DecoupledDecay(opt, 0.1, mode="constant").attach()
    for _ in range(5):
        p.grad = torch.ones_like(p)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 3.0 * 0.9**5))


def test_lr_ratio_keeps_its_own_reference():
    p = nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)  # rewrites initial_lr
    decay = DecoupledDecay(opt, 0.5, mode="lr_ratio", lr_ref=1.0)
    decay.attach()
    assert opt.param_groups[0]["initial_lr"] != 1.0
    p.grad = torch.zeros_like(p)
    lr0 = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    assert decay.last_coefficients == [pytest.approx(lr0 / 1.0 * 0.5)]
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 1 - lr0 * 0.5))
    default = DecoupledDecay(torch.optim.SGD([nn.Parameter(torch.ones(2, 2))], lr=0.3), 0.5, mode="lr_ratio")
    assert default.lr_refs == [0.3]


def test_default_exclusion_and_patterns_and_predicate():
    model = _model()
    names = dict(model.named_parameters())
    pred, _ = compile_exclude(None)
    assert {n for n, p in names.items() if pred(n, p)} == {"0.bias", "1.weight", "1.bias", "3.bias"}
    pred, patterns = compile_exclude([r"^3\."], exclude_1d=False)
    assert {n for n, p in names.items() if pred(n, p)} == {"3.weight", "3.bias"} and patterns == [r"^3\."]
    pred, _ = compile_exclude(lambda n, p: p.shape[0] == 3, exclude_1d=False)
    assert {n for n, p in names.items() if pred(n, p)} == {"3.weight", "3.bias"}
    assert unmatched_patterns(["bias", "nope"], names) == ["nope"]


def test_excluded_params_are_not_decayed():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    DecoupledDecay(opt, 0.5, mode="constant", named_parameters=model.named_parameters(), exclude="^3").attach()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 0.5 if n == "0.weight" else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_unmatched_pattern_warns():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="'embedding' matches no parameter of SGD"):
        DecoupledDecay(opt, 0.1, named_parameters=model.named_parameters(), exclude=["bias", "embedding"])


#: shared with tests/callbacks/test_decoupled_weight_decay.py (the callback validates the same way)
BAD_ARGUMENTS = [
    (dict(weight_decay=-0.1), r"`weight_decay` must be a finite number >= 0, got -0.1"),
    (dict(weight_decay=math.nan), r"`weight_decay` must be a finite number >= 0, got nan"),
    (dict(weight_decay=math.inf), r"`weight_decay` must be a finite number >= 0, got inf"),
    (dict(weight_decay="big"), r"`weight_decay` must be a finite number >= 0, got 'big'"),
    (dict(weight_decay=0.1, mode="adamw"), r"`mode` must be one of .*got 'adamw'"),
    (dict(weight_decay=0.1, lr_ref=0.0), r"`lr_ref` must be None, a finite number > 0.*got 0.0"),
    (dict(weight_decay=0.1, exclude=3), r"`exclude` must be None, a name pattern.*got 3"),
    (dict(weight_decay=0.1, exclude="(["), r"not a valid regular expression"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, match):
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        DecoupledDecay(opt, **kwargs)


def test_double_decay_refused_or_taken_over():
    model = _model()
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "weight_decay": 0.2}, {"params": model[3].parameters(), "weight_decay": 0.0}],
        lr=1e-3,
    )
    with pytest.raises(ValueError, match=r"Adam param group 0 has its own weight_decay=0.2.*weight_decay='optimizer'"):
        DecoupledDecay(opt, 0.1)
    decay = DecoupledDecay(opt, "optimizer", exclude_1d=False)
    assert decay.lambdas == [0.2, 0.0]
    seen = []
    StepHooks([opt], pre=lambda i, o: seen.append([g["weight_decay"] for g in o.param_groups]))
    decay.attach()  # registered after the probe: the probe sees λ, the optimizer will see 0
    w = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert seen == [[0.2, 0.0]]
    torch.testing.assert_close(model[0].weight.detach(), w * (1 - 1e-3 * 0.2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_optimizer_sees_zero_and_foreign_writes_survive(scheduler_first):
    """The optimizer step sees weight_decay == 0; a value written during the step by another
    post-hook (a scheduler) is kept, whatever the hook order, even when it writes 0.0."""
    p = nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.SGD([p], lr=0.0)
    inside = []
    schedule = iter([0.05, 0.0, 0.2])

    def scheduler_post(i, o):
        o.param_groups[0]["weight_decay"] = next(schedule)

    if scheduler_first:
        StepHooks([opt], post=scheduler_post)
    decay = DecoupledDecay(opt, 0.1, mode="constant")
    decay.attach()
    if not scheduler_first:
        StepHooks([opt], post=scheduler_post)
    StepHooks([opt], pre=lambda i, o: inside.append(o.param_groups[0]["weight_decay"]))  # after our pre
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert inside == [0.0, 0.0, 0.0]
    assert opt.param_groups[0]["weight_decay"] == 0.2
    # decays applied: 0.1 (own), then 0.05 and 0.0 (scheduled between steps)
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 0.9 * 0.95 * 1.0))


def test_step_that_raised_does_not_lose_lambda():
    p = nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.SGD([p], lr=0.0)
    decay = DecoupledDecay(opt, 0.1, mode="constant")
    decay.attach()
    p.grad = torch.zeros_like(p)
    decay.pre_step()  # as if optimizer.step() raised after the pre-hook
    assert opt.param_groups[0]["weight_decay"] == 0.0
    opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.1
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 0.9**2))


def test_new_param_group_is_adopted_and_checked():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.SGD([a], lr=0.0)
    decay = DecoupledDecay(opt, 0.5, mode="constant")
    decay.attach()
    opt.add_param_group({"params": [b], "weight_decay": 0.0})
    a.grad, b.grad = torch.zeros(2, 2), torch.zeros(2, 2)
    opt.step()
    assert decay.lambdas == [0.5, 0.5]
    torch.testing.assert_close(b.detach(), torch.full((2, 2), 0.5))
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "weight_decay": 0.3})
    with pytest.raises(ValueError, match="param group 2 has its own weight_decay=0.3"):
        opt.step()


def test_step_with_closure_decays_after_the_gradient_once():
    """optimizer.step(closure) (Lightning's automatic optimization) runs backward inside step:
    the decay must follow the closure, as in AdamW, and happen once even if it is re-called."""
    a, ref, b, opt, decay = _adamw_pair(3e-3, 0.3, True)

    def train_with_closure(model, optimizer, batches, positional):
        for x, y in batches:
            def closure(x=x, y=y):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            optimizer.step(closure) if positional else optimizer.step(closure=closure)

    batches = _batches(60)
    train_with_closure(a, ref, batches[:30], True)
    train_with_closure(b, opt, batches[:30], True)
    train_with_closure(a, ref, batches[30:], False)
    train_with_closure(b, opt, batches[30:], False)
    assert _max_diff(a, b) <= 1e-6 and StepLedger.of(opt).steps == 60
    p = nn.Parameter(torch.full((2, 2), 2.0))
    lbfgs = torch.optim.LBFGS([p], lr=0.0, max_iter=5)
    DecoupledDecay(lbfgs, 0.1, mode="constant").attach()

    def lbfgs_closure():
        lbfgs.zero_grad()
        loss = (p * torch.arange(4.0).view(2, 2)).sum()
        loss.backward()
        return loss

    lbfgs.step(lbfgs_closure)
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 1.8))
