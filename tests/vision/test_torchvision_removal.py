"""Channel removal on torchvision's classification zoo (random weights, ``num_classes=10``, 32x32 inputs,
eval mode): forcing channels dead and removing them keeps the outputs and the optimizer state consistent,
or keeps them under one message per unsupported pattern; no model crashes. Runs in ``.venv-vision``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from examples.benchmarks.bench_architectures import build, removal_run, train_step
from pl_optim.compression.graph import ChannelGraph

#: model -> (least % of parameters removed with every second channel dead, patterns that keep channels)
MODELS = {
    "resnet18": (70, []),
    "mobilenet_v2": (70, []),
    "mobilenet_v3_small": (70, []),  # squeeze-excitation gates, Hardsigmoid / Hardswish
    "efficientnet_b0": (70, []),  # squeeze-excitation gates, stochastic depth
    "regnet_x_400mf": (65, []),  # grouped convs: whole conv groups go
    "densenet121": (70, []),  # BatchNorm after concatenation
    "squeezenet1_1": (70, []),
    "convnext_tiny": (40, ["LayerNorm", "product of channels with a parameter"]),  # only the MLP hidden channels
    "shufflenet_v2_x0_5": (40, ["channel shuffle"]),
}


def _consistent(opt: torch.optim.Optimizer) -> None:
    for p, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == p.shape, (key, tuple(value.shape), tuple(p.shape))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forced_dead_channels_removed_outputs_kept(name):
    least, patterns = MODELS[name]
    run = removal_run(name, "half", size=32)
    torch.testing.assert_close(run["after"], run["before"], rtol=1e-4, atol=1e-5 * float(run["before"].abs().max()))
    assert run["removed_pct"] >= least, run["removed_pct"]
    unsupported = run["patterns"]
    assert len(unsupported) == len(patterns) and all(any(p in u for u in unsupported) for p in patterns), unsupported
    for group in run["graph"].groups:
        if not group.frozen:
            assert not any("network output" in f for f in group.frozen)
    _consistent(run["opt"])
    steps = {id(p): float(s["step"]) for p, s in run["opt"].state.items()}
    loss = train_step(run["model"], run["opt"], 32)  # training goes on at the new shapes
    assert torch.isfinite(torch.tensor(loss))
    _consistent(run["opt"])
    assert all(float(s["step"]) == steps[id(p)] + 1 for p, s in run["opt"].state.items())


def test_squeeze_excitation_gate_is_sliced_not_required_dead():
    run = removal_run("efficientnet_b0", "half", size=32)
    graph = run["graph"]
    se = next(g for g in graph.groups if any(n.endswith("block.2.fc2") for n in g.gates))
    assert not se.frozen and all(not n.endswith("fc2") for n in se.producers)
    fc2 = next(n for n in se.gates if n.endswith("fc2"))
    assert fc2 in run["removed"] and graph.modules[fc2].out_channels == graph.modules[se.producers[0]].out_channels


def test_grouped_conv_loses_whole_groups():
    run = removal_run("regnet_x_400mf", "half", size=32)
    convs = {n: m for n, m in run["model"].named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert convs
    for m in convs.values():
        assert m.in_channels == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels
    full = build("regnet_x_400mf")[0]
    for n, m in convs.items():
        before = dict(full.named_modules())[n]
        assert m.weight.shape[1] == before.weight.shape[1] and m.groups < before.groups


def test_densenet_batchnorm_after_concat_sliced_per_segment():
    run = removal_run("densenet121", "half", size=32)
    norm = dict(run["model"].named_modules())["features.denseblock1.denselayer3.norm1"]
    assert norm.num_features == (64 + 2 * 32) // 2  # three segments (64, 32, 32), each halved


def test_untraceable_model_refused_and_untouched():
    import torchvision.models as tvm

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tvm.resnet18(num_classes=10)

        def forward(self, x):
            return self.net(x) if x.sum() > 0 else -self.net(x)

    model = Branchy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="torch.fx-traceable"):
        ChannelGraph(model, torch.randn(1, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
