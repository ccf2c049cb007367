"""Dependency analysis (pl_optim.compression.graph): groups, consumers, zero checks, unsupported ops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pl_optim.compression.graph import ChannelGraph, zero_rows
from pl_optim.compression.surgery import ChannelRemover
from tests.core._channel_nets import ChannelsLastMLP, DenseCatNet, GatedNet, GroupedNet, SENet, kill, nets

X = torch.randn(4, 1, 8, 8)


def _group_of(graph: ChannelGraph, producer: str):
    return next(g for g in graph.groups if producer in g.producers)


def test_digits_chain_flatten_and_output():
    graph = ChannelGraph(nets()["digits"], X)
    g = _group_of(graph, "3.0")  # last conv: BN, max-pool, Flatten -> Linear(4 features per channel)
    assert g.channelwise == ["3.1"] and not g.frozen
    assert [(c.name, c.block) for c in g.consumers] == [("6", 4)]
    assert _group_of(graph, "0.0").consumers[0].name == "1.0"
    assert _group_of(graph, "6").frozen == ["network output"]


def test_resnet9_residual_couples_producers():
    graph = ChannelGraph(nets()["resnet9"], X)
    g = _group_of(graph, "1.0.0")
    assert g.producers == ["1.0.0", "1.2.block.1.0"]
    assert sorted(c.name for c in g.consumers) == ["1.2.block.0.0", "2.0.0"]
    # dead in only one producer of the residual sum -> kept; dead in both -> removable
    dead = {p: torch.zeros(8, dtype=torch.bool) for gr in graph.groups for p in gr.producers}
    kill(graph, [2])
    dead["1.0.0"][2] = True
    assert graph.groups.index(g) not in graph.removable(dead)
    dead["1.2.block.1.0"][2] = True
    assert graph.removable(dead)[graph.groups.index(g)].tolist() == [2]


def test_concat_segments_and_depthwise_channelwise():
    cat = ChannelGraph(nets()["concat"], X)
    a, b = _group_of(cat, "a.0"), _group_of(cat, "b.0")
    assert a.consumers[0].name == b.consumers[0].name == "c.0"
    assert [cat.space_group[s] for s in a.consumers[0].segments] == [cat.groups.index(a), cat.groups.index(b)]
    dw = ChannelGraph(nets()["depthwise"], X)
    g = _group_of(dw, "pw1")
    assert g.channelwise == ["bn1", "dw", "bn2"] and g.consumers[0].name == "pw2"
    assert not any(gr.producers == ["dw"] for gr in dw.groups)


@pytest.mark.parametrize(
    "shift, bias, removable",
    [(-1.0, 0.0, True), (0.0, 0.0, True), (0.5, 0.0, False), (-1.0, 0.3, False)],
)
def test_constant_contribution_must_be_zero(shift, bias, removable):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    graph = ChannelGraph(net, X)
    kill(graph, [1], shift=shift)
    with torch.no_grad():
        net[0].bias[1] = bias  # BN of a non-zero constant is not exactly its shift -> kept
    assert (graph.removable(zero_rows(net, graph)).get(0, torch.tensor([])).tolist() == [1]) is removable


def test_eval_mode_running_mean_counts():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    graph = ChannelGraph(net, X)
    kill(graph, [1], shift=-0.1)
    with torch.no_grad():
        net[1].running_mean[1] = -1.0  # eval: (0 - (-1)) / sqrt(1 + eps) * 1 - 0.1 > 0
    assert graph.removable(zero_rows(net, graph)) == {}
    with torch.no_grad():
        net[1].running_mean[1] = 0.05
    assert graph.removable(zero_rows(net, graph))[0].tolist() == [1]


def test_padding_bias_without_bn_kept():
    """A dead conv with bias b feeds b into a zero-padded conv: not a constant there -> kept."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1))
    graph = ChannelGraph(net, X)
    with torch.no_grad():
        net[0].weight[1] = 0
        net[0].bias[1] = 0.2
    assert graph.removable(zero_rows(net, graph)) == {}
    with torch.no_grad():
        net[0].bias[1] = 0.0
    assert graph.removable(zero_rows(net, graph))[0].tolist() == [1]


def test_unsupported_ops_freeze_and_report():
    net = GatedNet()
    graph = ChannelGraph(net, X)
    reasons = " | ".join(graph.unsupported)
    assert "getitem" in reasons and "neither a per-channel gate" in reasons and "mul" in reasons
    for name in ("c1", "c2", "c3"):
        assert _group_of(graph, name).frozen
    assert not _group_of(graph, "c4").frozen
    with torch.no_grad():
        for c in (net.c1, net.c2, net.c3, net.c4):
            c.weight[0] = 0
            c.bias[0] = 0
    plan = graph.removable(zero_rows(net, graph))
    assert [graph.groups[i].producers for i in plan] == [["c4"]]


def test_keeps_one_channel_and_requires_every_producer():
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    graph = ChannelGraph(net, torch.randn(2, 5))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
    assert graph.removable(zero_rows(net, graph))[0].tolist() == [1, 2]
    assert graph.removable({}) == {}


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="torch.fx-traceable"):
        ChannelGraph(Branchy(), X)


def test_spatial_mean_then_linear_and_modes_restored():
    class MeanNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    net = MeanNet()
    net.bn.eval()  # a user's frozen BatchNorm stays frozen after the analysis
    graph = ChannelGraph(net, X)
    assert net.training and not net.bn.training
    g = _group_of(graph, "conv")
    assert not g.frozen and [(c.name, c.block) for c in g.consumers] == [("head", 1)]
    kill(graph, [2])
    assert graph.removable(zero_rows(net, graph))[0].tolist() == [2]
    assert "mean" in " ".join(ChannelGraph(_AllMean(), X).unsupported)


class _AllMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(1)


def _remove_and_compare(net, graph, plan):
    net.eval()
    before_eval, before_train = net(X), copy.deepcopy(net).train()(X)
    removed = ChannelRemover(graph).remove(plan)
    torch.testing.assert_close(net(X), before_eval, atol=1e-5, rtol=0)
    torch.testing.assert_close(copy.deepcopy(net).train()(X), before_train, atol=1e-5, rtol=0)
    return removed


def test_squeeze_excitation_gate_sliced_with_its_channels():
    net = SENet()
    graph = ChannelGraph(net, X)
    g = _group_of(graph, "conv.0")
    assert g.gates == ["fc2"] and "fc2" not in g.producers and not g.frozen
    assert {c.name for c in g.consumers} == {"fc1", "out"}
    kill(graph, [1, 6], shift=0.0, only=("conv.0",))
    plan = graph.removable(zero_rows(net, graph))  # fc2 is alive (its gate is sigmoid(...) != 0): not needed dead
    assert plan[graph.groups.index(g)].tolist() == [1, 6]
    removed = _remove_and_compare(net, graph, {graph.groups.index(g): plan[graph.groups.index(g)]})
    assert removed == {"conv.0": 2, "fc2": 2} and net.fc1.in_channels == 6 and net.fc2.out_channels == 6


def test_se_gate_at_one_by_one_spatial_found_by_ancestry():
    graph = ChannelGraph(SENet(), torch.randn(2, 1, 1, 1))  # gate and input both [N, 8, 1, 1]
    assert _group_of(graph, "conv.0").gates == ["fc2"]


def test_batchnorm_after_concat_sliced_per_segment():
    net = DenseCatNet()
    graph = ChannelGraph(net, X)
    a, b = _group_of(graph, "a"), _group_of(graph, "b")
    assert a.channelwise == b.channelwise == ["norm"]
    assert graph.positions("norm", graph.groups.index(b)).tolist() == [list(range(8, 16))]
    kill(graph, [2, 5], shift=0.0, only=("a", "b"))
    with torch.no_grad():  # a's channels 2, 5 are also read by b: zero b's columns so a is only removed there
        net.b.weight[:, [2, 5]] = 0
    plan = graph.removable(zero_rows(net, graph))
    assert {graph.groups[i].producers[0]: v.tolist() for i, v in plan.items()} == {"a": [2, 5], "b": [2, 5]}
    _remove_and_compare(net, graph, plan)
    assert net.norm.num_features == 12 and net.out.in_channels == 12 and net.b.in_channels == 6


def test_grouped_conv_loses_whole_conv_groups_only():
    net = GroupedNet()
    graph = ChannelGraph(net, X)
    g = _group_of(graph, "a.0")
    assert g.channelwise == ["a.1", "b.0", "b.1"] and not g.frozen
    kill(graph, [2, 3, 4], shift=0.0, only=("a.0",))  # conv group 1 (channels 2, 3) whole, group 2 only half
    plan = graph.removable(zero_rows(net, graph))
    assert plan[graph.groups.index(g)].tolist() == [2, 3]
    _remove_and_compare(net, graph, plan)
    assert (net.b[0].groups, net.b[0].in_channels, net.b[0].out_channels) == (3, 6, 6)


def test_channels_last_linear_hidden_removed():
    net = ChannelsLastMLP()
    graph = ChannelGraph(net, X)
    g = _group_of(graph, "fc1")
    assert not g.frozen and [c.name for c in g.consumers] == ["fc2"]
    with torch.no_grad():
        net.fc1.weight[[0, 3]] = 0
        net.fc1.bias[[0, 3]] = 0
    plan = graph.removable(zero_rows(net, graph))
    assert plan == {graph.groups.index(g): plan[graph.groups.index(g)]} and plan[graph.groups.index(g)].tolist() == [0, 3]
    _remove_and_compare(net, graph, plan)
    assert net.fc1.out_features == 6 and net.fc2.in_features == 6


def test_one_message_per_pattern():
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(3))
            self.norms = nn.ModuleList(nn.GroupNorm(2, 4) for _ in range(3))

        def forward(self, x):
            for conv, norm in zip(self.convs, self.norms):
                x = norm(conv(x))
            return x

    reasons = [r for r in ChannelGraph(Normed(), X).unsupported if r != "network output"]
    assert reasons == ["LayerNorm/GroupNorm (normalises across channels): GroupNorm (norms.0) (and 2 more)"]


def test_channel_report_counts_dead_channels_kept():
    """A conv group only half dead keeps its dead channel; the report says so (``dead_kept``)."""
    from pl_optim.compression import ChannelRemoval, attach_quantizers, quantized_layers

    torch.manual_seed(0)
    net = GroupedNet()
    attach_quantizers(net, init_bits=4)
    with torch.no_grad():
        quantized_layers(net)["a.0"][1].bits[[2, 3, 4]] = 0.0  # conv group 1 (2, 3) whole, group 2 half
        net.a[1].bias[[2, 3, 4]] = 0.0
        net.a[1].running_mean[[2, 3, 4]] = 0.0
    removal = ChannelRemoval(net, example_input=X)
    assert removal.step() == {"a.0": 2}
    report = {c["layer"]: c for c in removal.channel_report()}
    assert (report["a.0"]["channels_before"], report["a.0"]["channels_after"], report["a.0"]["dead_kept"]) == (8, 6, 1)
    assert report["b.0"]["dead_kept"] == report["c"]["dead_kept"] == 0
