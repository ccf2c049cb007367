"""Per-channel quantiser: the formula, its straight-through gradients, attaching, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pl_optim.compression import (
    ChannelQuantizer,
    attach_quantizers,
    dead_channels,
    quantize,
    quantized_layers,
)
from pl_optim.compression.quantizer import initial_exponent, repair_nonfinite, round_bits, snapshot


@pytest.mark.parametrize(
    "w,b,e,expected",
    [
        ([0.3, -0.9, 2.0, -3.0], 2.0, 0.0, [0.0, -1.0, 1.0, -2.0]),  # clamp to [-2, 1]
        ([0.3, -0.9, 2.0, -3.0], 2.0, -1.0, [0.5, -1.0, 0.5, -1.0]),  # x2, clamp, round, /2
        ([0.3, -0.9, 2.0, -3.0], 3.0, 0.0, [0.0, -1.0, 2.0, -3.0]),  # [-4, 3]
        ([0.3, -0.9, 2.0, -3.0], 0.0, 0.0, [0.0, 0.0, 0.0, 0.0]),  # dead: clamp to -1/2, round -> 0
        ([0.3, -0.9, 2.0, -3.0], -1.5, 0.0, [0.0, 0.0, 0.0, 0.0]),  # negative acts as 0
        ([0.3, -0.9, 2.0, -3.0], 0.5, 0.0, [0.0, -1.0, 0.0, -1.0]),  # 0<b<1: [-0.71, -0.29]
        ([1.3, 0.26], 8.0, -2.0, [1.25, 0.25]),
    ],
)
def test_quantize_table(w, b, e, expected):
    q = quantize(torch.tensor([w]), torch.tensor([b]), torch.tensor([e]))
    torch.testing.assert_close(q, torch.tensor([expected]))


def test_straight_through_gradients_match_the_formula():
    # one channel, b = 2 -> integer range [-2, 1]; e = -1 -> x = 2 w
    w = torch.tensor([[0.2, 0.7, -0.4, -2.0]], requires_grad=True)  # x = 0.4, 1.4 (clipped), -0.8, -4 (clipped)
    b = torch.tensor([2.0], requires_grad=True)
    e = torch.tensor([-1.0], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (quantize(w, b, e) * upstream).sum().backward()
    # d/dw: 1 inside the clamp range, 0 where clipped
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
    # d/db: only the clipped weights; q = 2^e (2^(b-1) - 1) (upper) / -2^e 2^(b-1) (lower), d/db = +-2^e ln2 2^(b-1)
    ln2 = math.log(2)
    torch.testing.assert_close(b.grad, torch.tensor([0.5 * ln2 * 2 * (2.0 - 4.0)]))
    # d/de: unclipped q = 2^e (x + (round(x) - x)) -> ln2 2^e (round(x) - x); clipped q = 2^e c -> ln2 q
    x = torch.tensor([0.4, 1.4, -0.8, -4.0])
    q = torch.tensor([0.0, 0.5, -0.5, -1.0])
    de = ln2 * torch.where(torch.tensor([True, False, True, False]), 0.5 * (torch.round(x) - x), q)
    torch.testing.assert_close(e.grad, (de * upstream[0]).sum().reshape(1))


def test_dead_channel_has_zero_weights_and_no_bits_gradient():
    w = torch.randn(3, 5, requires_grad=True)
    b = torch.tensor([4.0, 0.0, -2.0], requires_grad=True)
    e = torch.full((3,), -3.0, requires_grad=True)
    q = quantize(w, b, e)
    assert torch.count_nonzero(q[1:]) == 0 and torch.count_nonzero(q[0]) > 0
    (q * torch.randn_like(q)).sum().backward()
    assert b.grad[1:].abs().sum() == 0
    quant = ChannelQuantizer(w.detach(), 4.0)
    with torch.no_grad():
        quant.bits.copy_(b)
    assert dead_channels(quant).tolist() == [False, True, True]


@pytest.mark.parametrize("init_bits", [8.0, 4.0, 2.0, 1.0, 0.5])
def test_initial_exponent_is_faithful(init_bits):
    w = torch.randn(6, 3, 3, 3) * torch.logspace(-3, 1, 6).reshape(-1, 1, 1, 1)
    e = initial_exponent(w, init_bits)
    q = quantize(w, torch.full((6,), init_bits), e)
    flat_w, flat_q = w.reshape(6, -1), q.reshape(6, -1)
    peak = flat_w.abs().argmax(dim=1)
    if init_bits > 1:  # the largest |w| of each channel is exactly a level: represented with rounding error only
        torch.testing.assert_close(flat_q.gather(1, peak[:, None]), flat_w.gather(1, peak[:, None]), rtol=1e-6, atol=0)
        step = torch.exp2(e).reshape(-1, 1)
        assert ((flat_q - flat_w).abs() <= step / 2 + 1e-6).all()
    # much better than the e = -8 start some ports use (which clips everything above 2^(b-1) 2^-8)
    err = (q - w).abs().max()
    err_fixed = (quantize(w, torch.full((6,), init_bits), torch.full((6,), -8.0)) - w).abs().max()
    assert err < err_fixed


def test_initial_exponent_of_zero_channel_is_zero():
    w = torch.zeros(2, 4)
    w[1] = 1.0
    assert initial_exponent(w, 8.0).tolist()[0] == 0.0


LAYERS = [
    nn.Conv1d(4, 6, 3),
    nn.Conv2d(4, 6, 3),
    nn.Conv3d(4, 6, 3),
    nn.Conv2d(4, 6, 3, groups=2),
    nn.Conv2d(4, 8, 3, groups=4),  # depthwise x2
    nn.Linear(4, 6),
]
INPUTS = [(2, 4, 9), (2, 4, 9, 9), (2, 4, 5, 5, 5), (2, 4, 9, 9), (2, 4, 9, 9), (2, 4)]


@pytest.mark.parametrize("layer,shape", list(zip(LAYERS, INPUTS)), ids=lambda v: type(v).__name__)
def test_attach_keeps_identity_and_outputs(layer, shape):
    model = nn.Sequential(layer)
    weight = layer.weight
    x = torch.randn(*shape)
    y_float = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before attaching
    attached = attach_quantizers(model, init_bits=12)
    assert list(attached) == ["0"] and list(quantized_layers(model)) == ["0"]
    assert layer.parametrizations.weight.original is weight
    q = attached["0"]
    assert q.bits.shape == q.exponent.shape == (layer.weight.shape[0],) and q.bits.dtype == torch.float32
    assert int(q.float_numel) == weight.numel()
    y = model(x)
    torch.testing.assert_close(y, y_float, rtol=0, atol=1e-3 * y_float.abs().max().item())
    keys = set(model.state_dict())
    assert {"0.parametrizations.weight.original", "0.parametrizations.weight.0.bits", "0.parametrizations.weight.0.exponent"} <= keys
    before = weight.detach().clone()
    y.square().sum().backward()
    opt.step()
    assert not torch.equal(before, weight.detach())  # the optimizer's tensor is still the layer's weight
    assert q.bits.grad is not None and q.exponent.grad is not None


def test_attach_exclude_and_idempotent():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    attached = attach_quantizers(model, exclude=["1.1"])
    assert list(attached) == ["0", "1.0"]
    assert attach_quantizers(model) == {"1.1": quantized_layers(model)["1.1"][1]}  # only the new one
    model2 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert list(attach_quantizers(model2, exclude="1")) == ["0"]  # a container excludes its layers


@pytest.mark.parametrize("bits", [0, -1, float("nan"), float("inf"), True, "8"])
def test_bad_init_bits(bits):
    with pytest.raises(ValueError, match=r"`init_bits` must be a positive finite number, got"):
        attach_quantizers(nn.Linear(2, 2), init_bits=bits)


def test_bad_exclude_and_model():
    with pytest.raises(ValueError, match=r"`exclude` name 'head' matches no .*layers are: \['0'\]"):
        attach_quantizers(nn.Sequential(nn.Linear(2, 2)), exclude=["head"])
    with pytest.raises(ValueError, match=r"the model \(Sequential\) has no Conv1d/Conv2d/Conv3d/Linear layer"):
        attach_quantizers(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_repair_nonfinite_restores_only_bad_entries():
    model = nn.Sequential(nn.Linear(3, 4))
    q = attach_quantizers(model)["0"]
    saved = snapshot(model)
    with torch.no_grad():
        q.bits.sub_(1.0)
        q.bits[1] = float("nan")
        q.exponent[2] = float("inf")
    assert repair_nonfinite(model, saved) == 2
    assert q.bits.tolist() == [7.0, 8.0, 7.0, 7.0]
    torch.testing.assert_close(q.exponent, saved[1])
    assert repair_nonfinite(model, saved) == 0


def test_round_bits_rounds_to_the_stored_widths_and_kills_channels_under_half_a_bit():
    layer = nn.Linear(4, 5)
    attach_quantizers(layer)
    q = layer.parametrizations.weight[0]
    with torch.no_grad():
        q.bits.copy_(torch.tensor([0.3, 0.5, 1.5, 2.7, -1.0]))
    assert round_bits(layer) == 5
    assert q.bits.tolist() == [0.0, 0.0, 2.0, 3.0, 0.0]  # halves to even; negative -> 0
    assert dead_channels(q).tolist() == [True, True, False, False, True]
    assert torch.equal(layer.weight[:2], torch.zeros(2, 4))  # dead: exactly zero weights
    assert round_bits(layer) == 0  # idempotent
