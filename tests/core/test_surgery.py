"""Channel surgery (pl_optim.compression.surgery): function preservation, Parameter identity,
optimizer-state slicing, and continued training equal to masked training of the full network."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pl_optim.compression.graph import ChannelGraph, zero_rows
from pl_optim.compression.surgery import ChannelRemover, apply_kept, slice_parameter
from tests.core._channel_nets import kill, nets

X = torch.randn(6, 1, 8, 8)


@pytest.mark.parametrize("name", ["digits", "resnet9", "concat", "depthwise"])
def test_removal_preserves_outputs(name):
    net = nets()[name]
    graph = ChannelGraph(net, X)
    kill(graph, [1, 3])
    net.eval()
    before_eval = net(X)
    before_train = copy.deepcopy(net).train()(X)  # a copy: train mode updates running stats
    n_before = sum(p.numel() for p in net.parameters())
    plan = graph.removable(zero_rows(net, graph))
    assert plan and all(v.tolist() == [1, 3] for v in plan.values())
    removed = ChannelRemover(graph).remove(plan)
    assert removed and set(removed.values()) == {2}
    assert sum(p.numel() for p in net.parameters()) < n_before
    torch.testing.assert_close(net(X), before_eval, atol=1e-5, rtol=0)
    torch.testing.assert_close(copy.deepcopy(net).train()(X), before_train, atol=1e-5, rtol=0)


def test_parameter_identity_grad_and_state_sliced():
    p = nn.Parameter(torch.arange(12.0).reshape(4, 3))
    opt = torch.optim.Adam([p], amsgrad=True)
    p.grad = torch.ones(4, 3)
    opt.step()
    step = opt.state[p]["step"].clone()
    slice_parameter(p, 0, torch.tensor([0, 2]), [opt])
    assert p.shape == (2, 3) and p.grad.shape == (2, 3)
    assert {k: tuple(v.shape) for k, v in opt.state[p].items()} == {
        "step": (), "exp_avg": (2, 3), "exp_avg_sq": (2, 3), "max_exp_avg_sq": (2, 3)
    }
    assert torch.equal(opt.state[p]["step"], step)
    assert opt.param_groups[0]["params"][0] is p


class _Mask(nn.Module):
    """Masks output channels of a weight (the un-removed reference network)."""

    def __init__(self, c_out: int, dead: list[int], dims: int) -> None:
        super().__init__()
        mask = torch.ones(c_out)
        mask[dead] = 0
        self.register_buffer("mask", mask.reshape(-1, *([1] * (dims - 1))))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True)


def _train(net, opt, steps, gen):
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw_amsgrad"])
def test_continued_training_equals_masked_training(kind):
    """Dead channels masked from the start (parametrize mask, BN shift < 0 so ReLU zeroes
    them); after 3 steps one copy loses them by surgery, the other keeps training masked."""
    net = nets()["digits"]
    graph = ChannelGraph(net, X)
    dead = [0, 5]
    kill(graph, dead)
    for g in graph.groups:
        if not g.frozen:
            conv = graph.modules[g.producers[0]]
            parametrize.register_parametrization(conv, "weight", _Mask(conv.out_channels, dead, conv.weight.dim()))
    opt = _optimizer(kind, net.parameters())
    gen = torch.Generator().manual_seed(1)
    _train(net, opt, 3, gen)
    ref, ref_opt = copy.deepcopy((net, opt))
    ref_gen = copy.deepcopy(gen)

    graph = ChannelGraph(net, X)  # analysis of the parametrized net
    weights = {id(p) for p in net.parameters()}
    plan = graph.removable(zero_rows(net, graph))
    assert {graph.groups[i].producers[0] for i in plan} == {"0.0", "1.0", "3.0"}
    ChannelRemover(graph).remove(plan, [opt])
    assert {id(p) for p in net.parameters()} == weights
    assert net[0][0].parametrizations.weight.original.shape[0] == 6
    assert net[0][0].parametrizations.weight[0].mask.shape[0] == 6

    _train(net, opt, 4, gen)
    _train(ref, ref_opt, 4, ref_gen)
    net.eval()
    ref.eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=1e-4)
    keep = torch.tensor([c for c in range(8) if c not in dead])
    torch.testing.assert_close(net[1][0].weight, ref[1][0].weight[keep][:, keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(net[0][1].bias, ref[0][1].bias[keep], atol=1e-5, rtol=1e-4)


def test_apply_kept_rebuilds_shapes_for_state_dict():
    net = nets()["resnet9"]
    graph = ChannelGraph(net, X)
    kill(graph, [4])
    remover = ChannelRemover(graph)
    remover.remove(graph.removable(zero_rows(net, graph)))
    net.eval()
    fresh = nets()["resnet9"]
    apply_kept(fresh, remover.kept)
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(X), net(X))
    with pytest.raises(ValueError, match="not in the model"):
        apply_kept(nn.Sequential(), remover.kept)


def test_export_removes_dead_channels_exactly():
    from pl_optim.compression import attach_quantizers, export_compressed

    net = nets()["resnet9"]
    graph = ChannelGraph(net, X)
    kill(graph, [0, 6])
    attach_quantizers(net, init_bits=8)
    net.eval()
    plain = export_compressed(net)
    small = export_compressed(net, X)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in plain.parameters())
    assert small[0][0].out_channels == 6 and small[6].in_features == 6
    torch.testing.assert_close(small(X), plain(X), atol=1e-5, rtol=0)
