"""Size in bits Q, weight count N, size loss and its gradient, report rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pl_optim.compression import (
    add_size_grad,
    attach_quantizers,
    compression_stats,
    float_weight_count,
    format_report,
    layer_sizes,
    quantized_layers,
    size_bits,
    size_loss,
)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, (3, 1), groups=2), nn.Flatten(), nn.Linear(6, 5))


def _set_bits(model, name, values):
    with torch.no_grad():
        quantized_layers(model)[name][1].bits.copy_(torch.tensor(values, dtype=torch.float32))


def test_size_at_init_is_float_count_times_bits():
    model = _model()
    attach_quantizers(model, init_bits=6)
    n = 4 * 3 * 9 + 6 * 2 * 3 + 5 * 6
    assert float_weight_count(model) == n
    assert size_bits(model).item() == 6 * n
    stats = compression_stats(model)
    assert stats["bits_pct"] == pytest.approx(100 * 6 / 32) and stats["weights_pct"] == 100.0


def test_size_counts_live_inputs_per_group_and_relu_bits():
    model = _model()
    attach_quantizers(model, init_bits=4)
    _set_bits(model, "0", [3.0, -1.0, 2.5, 0.0])  # relu: 3 + 0 + 2.5 + 0
    _set_bits(model, "2", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # groups: rows 0-2 read inputs 0-1, rows 3-5 read 2-3
    with torch.no_grad():
        model[2].parametrizations.weight.original[3:, 1] = 0.0  # group 1 no longer reads its 2nd input
    expected = 9 * 3 * 5.5 + 3 * (2 * (1 + 2 + 3) + 1 * (4 + 5 + 6)) + 6 * 4 * 5
    assert size_bits(model).item() == pytest.approx(expected)
    rows = {r.name: r for r in layer_sizes(model)}
    assert (rows["0"].out_alive, rows["0"].out_total, rows["0"].mean_bits) == (2, 4, pytest.approx(5.5 / 4))
    assert (rows["2"].in_alive, rows["2"].in_total, rows["2"].weights_kept) == (3, 4, 3 * (3 * 2 + 3 * 1))
    assert rows["0"].weights_kept == 2 * 3 * 9
    # a dead producer-side column: all weights reading input 1 of the Linear quantise to 0
    with torch.no_grad():
        model[4].parametrizations.weight.original[:, 1] = 0.0
    assert layer_sizes(model)[2].in_alive == 5
    assert "total" in format_report(layer_sizes(model))


def test_size_gradient_is_kernel_times_live_inputs():
    model = _model()
    attach_quantizers(model, init_bits=4)
    _set_bits(model, "0", [3.0, -1.0, 2.5, 0.0])
    gamma, n = 0.7, float_weight_count(model)
    size_loss(model, gamma).backward()
    bits0 = quantized_layers(model)["0"][1].bits
    torch.testing.assert_close(bits0.grad, torch.tensor([1.0, 0.0, 1.0, 0.0]) * gamma * 27 / n)
    torch.testing.assert_close(quantized_layers(model)["4"][1].bits.grad, torch.full((5,), gamma * 6 / n))


def test_add_size_grad_equals_adding_the_loss_term():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 5, 3)
    models = [_model(), _model()]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        attach_quantizers(m, init_bits=3)  # coarse: bits get task gradients too
    gamma = 2.5
    (models[0](x).square().mean() + size_loss(models[0], gamma)).backward()
    models[1](x).square().mean().backward()
    assert add_size_grad(models[1], gamma)
    for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p0.grad, p1.grad)


def test_add_size_grad_creates_missing_grads_and_refuses_nonfinite():
    model = _model()
    attach_quantizers(model)
    assert add_size_grad(model, 1.0)
    assert all(q.bits.grad is not None for _, q in quantized_layers(model).values())
    before = [q.bits.grad.clone() for _, q in quantized_layers(model).values()]
    with torch.no_grad():
        quantized_layers(model)["0"][1].bits[0] = float("nan")
    assert not add_size_grad(model, 1.0)
    for (_, q), b in zip(quantized_layers(model).values(), before):
        torch.testing.assert_close(q.bits.grad, b)  # nothing added


def test_size_needs_quantised_layers():
    with pytest.raises(ValueError, match="no quantised layer"):
        size_bits(nn.Linear(2, 2))


class _Res(nn.Module):
    """conv0 -> (conv1 + conv0) -> conv2 -> flatten -> linear: a two-producer group (c0, c1) and a
    Linear reading a block of H*W features per channel (fc)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        a = torch.relu(self.c0(x))
        b = self.c1(a) + a
        return self.fc(torch.flatten(self.c2(b), 1))


def test_column_cost_gradient_is_the_consumers_bits_per_bit_left():
    from pl_optim.compression import column_cost_loss
    from pl_optim.compression.graph import ChannelGraph

    model = _Res()
    attach_quantizers(model, init_bits=4)
    x = torch.randn(2, 1, 2, 2)
    graph = ChannelGraph(model, x)
    _set_bits(model, "c0", [0.5, 2.0, 0.0, 3.0])
    _set_bits(model, "c2", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    gamma, compute, n = 0.7, 0.3, float_weight_count(model)
    positions = {"c0": 4, "c1": 4, "c2": 4, "fc": 1}
    pn = sum(positions[k] * int(q.float_numel) for k, (_, q) in quantized_layers(model).items())
    column_cost_loss(model, graph, gamma, compute, positions).backward()
    # group (c0, c1): consumers c1 (kernel 9, 4 rows at 4 bits) and c2 (kernel 1, rows at 1..6 bits)
    w = gamma / n + compute * 4 / pn
    s = w * (9 * 4 * 4 + 21) * torch.ones(4)
    b0 = torch.tensor([0.5, 2.0, 0.0, 3.0])
    expected0 = s / 2 * (b0 > 0) / b0.clamp(min=1)  # two producers share the push
    torch.testing.assert_close(quantized_layers(model)["c0"][1].bits.grad, expected0)
    torch.testing.assert_close(quantized_layers(model)["c1"][1].bits.grad, s / 2 / 4)
    # group c2: consumer fc reads 4 features (2x2) per channel, 3 rows at 4 bits each
    w_fc = gamma / n + compute * 1 / pn
    b2 = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    torch.testing.assert_close(quantized_layers(model)["c2"][1].bits.grad, w_fc * 4 * 3 * 4 / b2)
    assert quantized_layers(model)["fc"][1].bits.grad is None  # the output's channels are kept: no column cost


def test_add_size_grad_adds_the_column_cost_times_its_weight():
    from pl_optim.compression import column_cost_loss
    from pl_optim.compression.graph import ChannelGraph

    models = [_Res(), _Res()]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(2, 1, 2, 2)
    for m in models:
        attach_quantizers(m, init_bits=3)
    (size_loss(models[0], 0.5) + 2.5 * column_cost_loss(models[0], ChannelGraph(models[0], x), 0.5)).backward()
    assert add_size_grad(models[1], 0.5, graph=ChannelGraph(models[1], x), column_cost=2.5)
    for (_, q0), (_, q1) in zip(quantized_layers(models[0]).values(), quantized_layers(models[1]).values()):
        torch.testing.assert_close(q0.bits.grad, q1.bits.grad)


def test_input_feature_bits_counts_the_rows_of_each_conv_group():
    from pl_optim.compression.size import input_feature_bits

    model = _model()
    attach_quantizers(model, init_bits=4)
    _set_bits(model, "2", [1.0, 2.0, 3.0, -4.0, 5.0, 6.0])  # rows 0-2 read inputs 0-1, rows 3-5 read 2-3
    layer, q = quantized_layers(model)["2"]
    torch.testing.assert_close(input_feature_bits(layer, q), 3 * torch.tensor([6.0, 6.0, 11.0, 11.0]))
