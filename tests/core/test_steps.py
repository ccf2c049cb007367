"""pl_optim.steps.StepLedger: which optimizer steps really ran, whatever calls step()."""

from __future__ import annotations

import pytest
import torch

from pl_optim.steps import StepHooks, StepLedger, has_gradient


class SubclassAdam(torch.optim.Adam):
    """The common pattern: override step and call super().step(closure)."""

    def step(self, closure=None):
        return super().step(closure)


class Wrapper(torch.optim.Optimizer):
    """A wrapper optimizer (Lookahead-style) sharing its inner optimizer's groups and state."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__(inner.param_groups, inner.defaults)
        # share the inner optimizer's lists (as Lookahead & co. do), so add_param_group reaches it
        self.inner, self.state, self.param_groups = inner, inner.state, inner.param_groups

    def step(self, closure=None):
        return self.inner.step(closure)


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones(3))


def _backward(p: torch.Tensor) -> torch.Tensor:
    loss = (p**2).sum()
    loss.backward()
    return loss


def _record(ledger: StepLedger) -> list[str]:
    calls: list[str] = []
    ledger.subscribe(before=lambda o: calls.append(f"b{ledger.steps}"), after=lambda o: calls.append(f"a{ledger.steps}"))
    return calls


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam([p], lr=0.1),
    lambda p: SubclassAdam([p], lr=0.1),
    lambda p: Wrapper(torch.optim.Adam([p], lr=0.1)),
    lambda p: Wrapper(SubclassAdam([p], lr=0.1)),
], ids=["plain", "subclass", "wrapper", "wrapper-of-subclass"])
@pytest.mark.parametrize("closure", ["none", "positional", "keyword"])
def test_each_step_counts_once_however_step_is_called(make, closure):
    torch.optim.Adam([_param()])  # a plain instance first: torch then wraps both classes' step
    p = _param()
    opt = make(p)
    ledger = StepLedger.of(opt)
    calls = _record(ledger)

    def fn():
        opt.zero_grad()
        return _backward(p)

    for _ in range(3):
        if closure == "none":
            fn()
            opt.step()
        elif closure == "positional":
            opt.step(fn)
        else:
            opt.step(closure=fn)
    assert ledger.steps == 3 and ledger.empty == 0
    assert calls == ["b0", "a1", "b1", "a2", "b2", "a3"]
    ref = _param()
    ref_opt = torch.optim.Adam([ref], lr=0.1)
    for _ in range(3):
        ref_opt.zero_grad()
        _backward(ref)
        ref_opt.step()
    assert torch.equal(p, ref)  # the wrapping did not change the maths


def test_subclass_without_the_ledger_fires_torch_hooks_twice():
    """The failure the ledger exists for: torch's own step hooks run twice for a subclass."""
    torch.optim.Adam([_param()])
    p = _param()
    opt = SubclassAdam([p], lr=0.1)
    raw = []
    opt.register_step_post_hook(lambda *a: raw.append(1))
    ledger = StepLedger.of(opt)
    _backward(p)
    opt.step()
    assert len(raw) == 2 and ledger.steps == 1


def test_step_without_gradients_counts_zero_and_fires_nothing():
    p = _param()
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    ledger = StepLedger.of(opt)
    calls = _record(ledger)
    opt.step()  # no gradient at all (Lightning calls step() when training_step returned None)
    opt.step(lambda: None)  # a closure that computes no gradient
    assert (ledger.steps, ledger.empty, calls) == (0, 2, [])
    assert not has_gradient(opt)
    _backward(p)
    opt.step()
    assert (ledger.steps, ledger.empty, calls) == (1, 2, ["b0", "a1"])


def test_closure_gradients_exist_in_before_and_lbfgs_counts_once():
    p = _param()
    opt = torch.optim.LBFGS([p], lr=0.1, max_iter=5)
    ledger = StepLedger.of(opt)
    seen = []
    ledger.subscribe(before=lambda o: seen.append(None if p.grad is None else p.grad.clone()))
    evaluations = []

    def closure():
        opt.zero_grad()
        evaluations.append(1)
        return _backward(p)

    opt.step(closure)
    assert len(evaluations) > 1  # LBFGS evaluated the closure several times ...
    assert ledger.steps == 1 and len(seen) == 1  # ... but it is one step, announced once
    assert torch.equal(seen[0], torch.full((3,), 2.0))  # with the gradient of the weights before the update


def test_a_step_that_raises_leaves_no_trace():
    p = _param()
    opt = torch.optim.SGD([p], lr=0.1)
    ledger = StepLedger.of(opt)

    def bad():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(bad)
    _backward(p)
    opt.step()
    assert (ledger.steps, ledger.empty) == (1, 0)


def test_scaler_skip_is_reported_and_does_not_count():
    p = _param()
    opt = torch.optim.SGD([p], lr=0.1)
    ledger = StepLedger.of(opt)
    calls = _record(ledger)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p**2).sum()).backward()
    p.grad.fill_(float("inf"))
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    if scaler.get_scale() < before:  # what a precision plugin does when the scale dropped
        ledger.note_skipped()
    assert (ledger.steps, ledger.skipped, ledger.last_skipped, calls) == (0, 1, True, [])
    opt.zero_grad()
    _backward(p)
    opt.step()
    assert (ledger.steps, ledger.last_skipped) == (1, False)


def test_one_ledger_per_optimizer_and_fresh_for_copies():
    import copy

    opt = torch.optim.SGD([_param()], lr=0.1)
    assert StepLedger.of(opt) is StepLedger.of(opt)
    clone = copy.deepcopy(opt)
    assert StepLedger.of(clone) is not StepLedger.of(opt) and StepLedger.of(clone).optimizer is clone
    with pytest.raises(TypeError, match="use StepLedger.of"):
        StepLedger(opt)
    with pytest.raises(TypeError, match="optimizer 0 is a list"):
        StepLedger.of([1])


def test_unsubscribe_and_state_round_trip():
    p = _param()
    opt = torch.optim.SGD([p], lr=0.1)
    ledger = StepLedger.of(opt)
    calls = []
    handle = ledger.subscribe(after=lambda o: calls.append(1))
    hooks = StepHooks([opt], post=lambda i, o: calls.append(10 + i))
    _backward(p)
    opt.step()
    handle.remove()
    handle.remove()  # idempotent
    hooks.remove()
    opt.step()
    assert calls == [1, 10] and ledger.steps == 2
    state = ledger.state_dict()
    other = StepLedger.of(torch.optim.SGD([_param()], lr=0.1))
    other.load_state_dict(state)
    assert other.state_dict() == state == {"steps": 2, "empty": 0, "skipped": 0}
    with pytest.raises(ValueError, match="needs `before` or `after`"):
        ledger.subscribe()
