"""set_amsgrad: parity with Adam(amsgrad=True), mid-run switching, state creation/dropping,
cross-loading state dicts saved under the other setting, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pl_optim import set_amsgrad
from pl_optim.amsgrad import amsgrad_enabled

IMPLS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]


def _setup(opt_cls, impl, amsgrad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    return model, opt_cls(model.parameters(), lr=1e-2, amsgrad=amsgrad, **impl)


def _step(model, opt, g):
    x = torch.randn(8, 5, generator=g)
    opt.zero_grad()
    # a loss whose gradient scale shrinks over time, so max(v) != v and AMSGrad differs from Adam
    (model(x).pow(2).mean() * (1.0 + 10.0 * torch.rand((), generator=g))).backward()
    opt.step()


def _run(model, opt, steps, seed=1, g=None):
    g = g or torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _step(model, opt, g)
    return g


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("impl", IMPLS, ids=["single", "foreach", "fused"])
@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_enable_at_step_zero_equals_native_amsgrad(opt_cls, impl):
    ref_model, ref = _setup(opt_cls, impl, amsgrad=True)
    model, opt = _setup(opt_cls, impl, amsgrad=False)
    set_amsgrad(opt, True)
    _run(ref_model, ref, 100)
    _run(model, opt, 100)
    assert torch.equal(_flat(model), _flat(ref_model))
    plain_model, plain = _setup(opt_cls, impl, amsgrad=False)
    _run(plain_model, plain, 100)
    assert (_flat(plain_model) - _flat(ref_model)).abs().max() > 1e-4  # AMSGrad did matter


@pytest.mark.parametrize("impl", IMPLS, ids=["single", "foreach", "fused"])
def test_enable_mid_run_starts_max_from_exp_avg_sq(impl):
    """After switching on at step k, max_exp_avg_sq = max(v_k, v_{k+1}), with v from a twin
    Adam that never switched (v does not depend on amsgrad)."""
    model, opt = _setup(torch.optim.Adam, impl, amsgrad=False)
    g = _run(model, opt, 10)
    set_amsgrad(opt, True)
    assert amsgrad_enabled(opt) == [True]
    v_k = {p: opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()}
    for p in model.parameters():
        assert torch.equal(opt.state[p]["max_exp_avg_sq"], v_k[p])
    _step(model, opt, g)
    for p in model.parameters():
        st = opt.state[p]
        assert torch.equal(st["max_exp_avg_sq"], torch.maximum(v_k[p], st["exp_avg_sq"]))
    set_amsgrad(opt, True)  # idempotent: the running max is kept
    for p in model.parameters():
        assert torch.equal(opt.state[p]["max_exp_avg_sq"], torch.maximum(v_k[p], opt.state[p]["exp_avg_sq"]))
    _run(model, opt, 5, g=g)  # and it keeps stepping


@pytest.mark.parametrize("impl", IMPLS, ids=["single", "foreach", "fused"])
def test_disable_drops_state_and_continues_as_adam(impl):
    model, opt = _setup(torch.optim.AdamW, impl, amsgrad=True)
    g = _run(model, opt, 10)
    twin, twin_opt = _setup(torch.optim.AdamW, impl, amsgrad=True)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch would share the tensors
    set_amsgrad(opt, False)
    assert all("max_exp_avg_sq" not in opt.state[p] for p in model.parameters())
    twin_opt.param_groups[0]["amsgrad"] = False  # torch ignores a leftover max when disabled
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    _run(model, opt, 10, g=g)
    _run(twin, twin_opt, 10, g=g2)
    assert torch.equal(_flat(model), _flat(twin))


def test_parameters_without_state_are_left_to_torch():
    model, opt = _setup(torch.optim.Adam, dict(foreach=True), amsgrad=False)
    frozen = model[2].weight
    frozen.requires_grad_(False)
    _run(model, opt, 3)
    set_amsgrad(opt, True)
    assert frozen not in opt.state or not opt.state[frozen]
    frozen.requires_grad_(True)
    _run(model, opt, 3)  # lazily initialised by torch, with the max
    st = opt.state[frozen]
    assert st["step"].item() == 3 and bool((st["max_exp_avg_sq"] >= st["exp_avg_sq"]).all())


@pytest.mark.parametrize("saved,wanted", [(True, False), (False, True)])
def test_state_dict_saved_under_other_setting(saved, wanted):
    model, opt = _setup(torch.optim.Adam, dict(foreach=True), amsgrad=saved)
    _run(model, opt, 5)
    state = opt.state_dict()
    new_model, new_opt = _setup(torch.optim.Adam, dict(foreach=True), amsgrad=wanted)
    new_model.load_state_dict(model.state_dict())
    new_opt.load_state_dict(copy.deepcopy(state))  # torch restores the saved flag with the saved state
    new_opt.param_groups[0]["amsgrad"] = wanted  # what a user flipping the flag would do ...
    if wanted:
        with pytest.raises(KeyError, match="max_exp_avg_sq"):  # ... the fairseq#3965 failure
            _run(new_model, new_opt, 1)
    set_amsgrad(new_opt, wanted)
    _run(new_model, new_opt, 5)
    assert all(("max_exp_avg_sq" in new_opt.state[p]) == wanted for p in new_model.parameters())


def test_refuses_optimizers_without_amsgrad():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="SGD has no `amsgrad` option"):
        set_amsgrad(opt, True)
    with pytest.raises(ValueError, match="RMSprop has no `amsgrad` option"):
        set_amsgrad(torch.optim.RMSprop([nn.Parameter(torch.ones(2))]), False)
    with pytest.raises(ValueError, match="`enabled` must be True or False, got 1"):
        set_amsgrad(torch.optim.Adam([nn.Parameter(torch.ones(2))]), 1)
    with pytest.raises(TypeError, match="optimizer 0 is a dict"):
        set_amsgrad({}, True)
