"""Export: plain module with the quantised weights; bit-packed file that reloads to the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pl_optim.compression import (
    attach_quantizers,
    export_compressed,
    load_packed,
    quantized_layers,
    read_packed,
    save_packed,
)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 6, 1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 5),
    )


def _compressed(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = _net()
    attach_quantizers(net, init_bits=6)
    with torch.no_grad():
        for i, (_, q) in enumerate(quantized_layers(net).values()):
            q.bits.copy_(torch.rand(q.bits.shape) * 7 - 1)  # mixed widths, some dead (<= 0), some in (0, 1)
            q.bits[i % q.bits.numel()] = 0.0
            q.exponent.add_(torch.rand(q.exponent.shape))  # coarser grid: many zero codes
    net.eval()
    return net


def test_export_is_plain_and_matches():
    net = _compressed()
    x = torch.randn(4, 3, 4, 4)
    plain = export_compressed(net)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert not any("bits" in k or "exponent" in k for k in plain.state_dict())
    assert set(plain.state_dict()) == {k.replace(".parametrizations.weight.original", ".weight") for k in net.state_dict()
                                       if "weight.0." not in k}
    torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)
    torch.testing.assert_close(plain[0].weight, net[0].weight)
    assert quantized_layers(net)  # the original keeps its quantisers
    dead = quantized_layers(net)["0"][1].bits <= 0
    assert dead.any() and (plain[0].weight[dead] == 0).all()


def test_packed_file_reloads_to_the_same_outputs(tmp_path):
    net = _compressed()
    x = torch.randn(4, 3, 4, 4)
    sizes = save_packed(net, tmp_path / "net.ploq")
    assert sizes.total == (tmp_path / "net.ploq").stat().st_size == sizes.weights + sizes.other + sizes.header
    fresh = _net().eval()
    load_packed(tmp_path / "net.ploq", fresh)
    torch.testing.assert_close(fresh(x), export_compressed(net)(x), rtol=0, atol=0)
    for key, value in export_compressed(net).state_dict().items():
        torch.testing.assert_close(read_packed(tmp_path / "net.ploq")[key], value, rtol=0, atol=0)
    # the weight payload: integers at no more than ceil(b) bits each + per channel (width, exponent) + masks
    q_bits = sum(
        (torch.ceil(torch.relu(q.bits)) * (layer.weight.reshape(layer.weight.shape[0], -1) != 0).any(1)).sum().item()
        * layer.weight[0].numel()
        for layer, q in quantized_layers(net).values()
    )
    channels = sum(q.bits.numel() for _, q in quantized_layers(net).values())
    assert sizes.weights * 8 <= q_bits + channels * 40 + 8 * 64
    nonzero = sum(int((layer.weight != 0).sum()) for layer, _ in quantized_layers(net).values())
    assert sizes.weights * 8 >= nonzero + channels * 40  # >= 1 bit per nonzero integer + (width, exponent)


def test_packed_size_shrinks_with_bits(tmp_path):
    net = _compressed()
    before = save_packed(net, tmp_path / "a").weights
    with torch.no_grad():
        for _, q in quantized_layers(net).values():
            q.bits.mul_(0.5)
    assert save_packed(net, tmp_path / "b").weights < before


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="no quantised layer to export"):
        export_compressed(_net())
    with pytest.raises(ValueError, match="no quantised layer to pack"):
        save_packed(_net(), tmp_path / "x")
    net = _compressed()
    save_packed(net, tmp_path / "net.ploq")
    with pytest.raises(ValueError, match="carries quantisers"):
        load_packed(tmp_path / "net.ploq", net)
    (tmp_path / "bad").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a pl_optim packed file"):
        read_packed(tmp_path / "bad")


def test_packed_file_of_a_shrunk_network_loads_into_a_full_size_one(tmp_path):
    from pl_optim.compression.surgery import slice_module

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),
                             nn.Flatten(), nn.Linear(6 * 4, 5)).eval()

    torch.manual_seed(0)
    model = net()
    attach_quantizers(model, init_bits=5)
    keep = torch.tensor([0, 2, 3, 6, 7])  # channel removal of part II shrinks layers in place
    slice_module(model[0], out_keep=keep)
    slice_module(model[1], out_keep=keep)
    slice_module(model[3], in_keep=keep)
    save_packed(model, tmp_path / "small.ploq")
    x = torch.randn(2, 3, 4, 4)
    reloaded = load_packed(tmp_path / "small.ploq", net())
    assert reloaded[0].weight.shape == (5, 3, 3, 3) and reloaded[3].weight.shape == (6, 5, 1, 1)
    torch.testing.assert_close(reloaded(x), export_compressed(model)(x), rtol=0, atol=0)


def test_recalibrate_batchnorm_averages_over_all_inputs():
    from pl_optim.compression import recalibrate_batchnorm

    net = _compressed()  # eval mode
    net[1].momentum = 0.3
    batches = [torch.randn(5, 3, 4, 4) for _ in range(3)]
    with torch.no_grad():
        pre = torch.cat([net[0](b) for b in batches])  # the BatchNorm's input, quantised conv
    assert recalibrate_batchnorm(net, iter(batches)) == 1
    torch.testing.assert_close(net[1].running_mean, pre.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # cumulative average of the per-batch unbiased variances
    var = torch.stack([net[0](b).detach().var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert net[1].momentum == 0.3 and not net.training and not net[1].training
    assert recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(1, 2)]) == 0
