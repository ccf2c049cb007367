"""simplify_for_inference: dead residual branches become constants, BatchNorm folds, outputs stay."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from examples.models import ResNet9
from pl_optim.compression import attach_quantizers, export_compressed, quantized_layers
from pl_optim.compression.inference import simplify_for_inference


def _randomise_bn(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _resnet9(kill_branch: bool) -> nn.Module:
    torch.manual_seed(0)
    net = ResNet9(widths=(4, 8, 8, 8), in_channels=1).net
    with torch.no_grad():
        _randomise_bn(net)
        if kill_branch:  # every output channel of layer3's residual branch is dead: the branch is a constant
            for conv in (net[3][2].block[0][0], net[3][2].block[1][0]):
                conv.weight.zero_()
    return net.eval()


def _modules(gm: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in gm.modules())


def test_dead_branch_becomes_one_constant_add_bit_identical():
    net, x = _resnet9(kill_branch=True), torch.randn(5, 1, 8, 8)
    small = simplify_for_inference(net, x, fold_batchnorm=False)
    assert isinstance(small, fx.GraphModule) and not small.training
    assert _modules(net, nn.Conv2d) == 8 and _modules(small, nn.Conv2d) == 6  # the branch's two convs are gone
    assert _modules(small, nn.BatchNorm2d) == 6
    consts = [b for n, b in small.named_buffers() if n.startswith("_folded_constant")]
    assert len(consts) == 1 and consts[0].shape == (1, 8, 1, 1) and bool(consts[0].count_nonzero())
    with torch.no_grad():
        for batch in (x, torch.randn(1, 1, 8, 8), 100 * torch.randn(64, 1, 8, 8)):  # other inputs, other batch sizes
            assert torch.equal(small(batch), net(batch))


def test_live_network_is_only_batchnorm_folded():
    net, x = _resnet9(kill_branch=False), torch.randn(5, 1, 8, 8)
    assert not [n for n, _ in simplify_for_inference(net, x, fold_batchnorm=False).named_buffers()
                if n.startswith("_folded")]
    small = simplify_for_inference(net, x)
    assert _modules(small, nn.Conv2d) == 8 and _modules(small, nn.BatchNorm2d) == 0
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)
    assert _modules(net, nn.BatchNorm2d) == 8 and net[0][1].running_var.min() >= 0.5  # the input is unchanged


class _Branches(nn.Module):
    """x -> conv; plus three input-independent branches: one exactly 0, one a non-zero constant, and
    one where a constant passes a live (non-zero) padded conv, which is NOT constant at the borders."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Conv2d(1, 3, 3, padding=1)
        self.zero = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU())
        self.const = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(1))
        self.border = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1))
        with torch.no_grad():
            for conv in (self.zero[0], self.const[0], self.border[0]):
                conv.weight.zero_()
            self.const[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main(x)
        return (y + self.zero(x)) - self.const(x) + self.border(x)


def test_zero_branch_dropped_constant_folded_border_branch_kept():
    net, x = _Branches().eval(), torch.randn(4, 1, 6, 6)
    small = simplify_for_inference(net, x, fold_batchnorm=False)
    names = {n for n, _ in small.named_modules()}
    assert "zero.0" not in names and "const.0" not in names  # folded away
    assert {"border.0", "border.1"} <= names  # a constant through a live padded conv is not constant
    consts = [b for n, b in small.named_buffers() if n.startswith("_folded_constant")]
    assert len(consts) == 1 and consts[0].flatten().tolist() == [0.5, 0.0, 2.0]
    assert sum(n.op == "call_function" for n in small.graph.nodes) == 2  # x + 0 is gone: one sub, one add
    with torch.no_grad():
        assert torch.equal(small(x), net(x))


class _Broadcast(nn.Module):
    """The live operand is [N, C, 1, 1]: replacing the [N, C, H, W] constant would change the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = nn.Conv2d(1, 2, 3, padding=1)
        self.live = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveMaxPool2d(1))
        with torch.no_grad():
            self.dead.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.live(x) + self.dead(x)


def test_broadcasting_operand_is_not_folded():
    net, x = _Broadcast().eval(), torch.randn(3, 1, 5, 5)
    small = simplify_for_inference(net, x)
    assert "dead" in {n for n, _ in small.named_modules()}
    with torch.no_grad():
        assert small(x).shape == (3, 2, 5, 5) and torch.equal(small(x), net(x))


def test_exported_compressed_network_simplifies():
    """The use it is for: a self-compressed ResNet-9 whose layer-3 branch died, exported and simplified."""
    net = _resnet9(kill_branch=False).train()
    attach_quantizers(net, init_bits=6)
    with torch.no_grad():
        for name, (_, q) in quantized_layers(net).items():
            if name.startswith("3.2.block"):
                q.bits.fill_(-1.0)  # dead: quantised weights are exactly 0
    x = torch.randn(6, 1, 8, 8)
    exported = export_compressed(net.eval(), x)
    small = simplify_for_inference(exported, x)
    assert _modules(small, nn.Conv2d) == _modules(exported, nn.Conv2d) - 2
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="simplify_for_inference needs a torch.fx-traceable module"):
        simplify_for_inference(Untraceable(), torch.ones(1))
    with pytest.raises(ValueError, match="`fold_batchnorm` must be a bool, got 'yes'"):
        simplify_for_inference(nn.Linear(2, 2), torch.ones(1, 2), fold_batchnorm="yes")
    with pytest.raises(ValueError, match="`example_args`"):
        simplify_for_inference(nn.Linear(2, 2))
    quantised = _resnet9(kill_branch=False)
    attach_quantizers(quantised)
    with pytest.raises(ValueError, match="`module` carries quantisers; simplify the plain network export_compressed"):
        simplify_for_inference(quantised, torch.ones(1, 1, 8, 8))
