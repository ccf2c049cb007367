"""Channel removal on torchvision's classification models: what the dependency analysis supports.

For each model (random weights, ``num_classes=10``, eval mode, no download): quantisers attached,
one Adam step, then channels forced dead in every group the analysis can remove (bit depth < 0,
bias / BatchNorm shift / their Adam moments 0, running mean 0), removed by the surgery, and the
outputs compared with the model before removal. Printed per model: parameters, groups kept
(frozen) and why, the parameters removed when every second channel (every second conv group, for
grouped convs) is dead, the most removable (all but one channel / conv group of every group), and
the largest output difference.

Needs torchvision: run it in the vision venv (``bash scripts/setup_vision_env.sh``)::

    .venv-vision/bin/python -m examples.benchmarks.bench_architectures
    .venv-vision/bin/python -m examples.benchmarks.bench_architectures --models resnet18 densenet121 --size 64

Pure torch (no lightning): the helpers are shared with ``tests/vision``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from pl_optim.compression import attach_quantizers, quantized_layers, quantizer_parameters
from pl_optim.compression.graph import ChannelGraph, zero_rows
from pl_optim.compression.surgery import ChannelRemover, shrink_constants

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
          "densenet121", "convnext_tiny", "shufflenet_v2_x0_5", "squeezenet1_1", "vgg11_bn")


def conv_group_size(graph: ChannelGraph, index: int) -> int:
    """Channels per conv group of the grouped convs sliced with group ``index`` (1 if none)."""
    g = graph.groups[index]
    return max([int(graph.modules[n].weight.shape[1]) for n in g.channelwise
                if isinstance(graph.modules[n], nn.Conv2d) and graph.modules[n].groups > 1] + [1])


def force_dead(model: nn.Module, graph: ChannelGraph, keep: str, optimizers=()) -> None:
    """Make channels dead in every removable group: ``keep="half"`` kills every second channel (every
    second conv group), ``keep="one"`` all but the first (conv group). Dead: bit depth < 0 (every
    quantised weight exactly 0), bias / BatchNorm shift and their optimizer moments 0, running mean 0."""
    layers = quantized_layers(model)
    masks = {}
    for i, g in enumerate(graph.groups):
        if g.frozen:
            continue
        k = conv_group_size(graph, i)
        blocks = torch.zeros(graph.group_size(i) // k, dtype=torch.bool)
        blocks[slice(1, None, 2 if keep == "half" else 1)] = True
        masks[i] = blocks.repeat_interleave(k)
        with torch.no_grad():
            for p in g.producers:
                layers[p][1].bits[masks[i]] = -10.0
    shrink_constants(graph, {i: m for i, m in masks.items() if m.any()}, float("inf"), list(optimizers))
    with torch.no_grad():
        for i, m in masks.items():
            for name in graph.groups[i].channelwise:
                mod = graph.modules[name]
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.running_mean[graph.positions(name, i)[:, m].flatten()] = 0


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``torchvision.models.<name>(num_classes=10)`` with quantisers and an Adam over weights, bits, exponents."""
    import torchvision.models as tvm

    torch.manual_seed(seed)
    model = getattr(tvm, name)(weights=None, num_classes=10)
    attach_quantizers(model)
    q = {id(p) for p in quantizer_parameters(model)}
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if id(p) not in q]},
                            {"params": quantizer_parameters(model), "weight_decay": 0.0}], lr=1e-3)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, size: int, batch: int = 4) -> float:
    model.train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    model.eval()
    return float(loss.detach())


def removal_run(name: str, keep: str = "half", size: int = 32, seed: int = 0) -> dict:
    """One model: a step, channels forced dead, removal; returns the figures (and the model, optimizer)."""
    model, opt = build(name, seed)
    train_step(model, opt, size)
    x = torch.randn(2, 3, size, size)
    t0 = time.perf_counter()
    graph = ChannelGraph(model, x)
    trace_s = time.perf_counter() - t0
    force_dead(model, graph, keep, [opt])
    with torch.no_grad():
        before = model(x)
    n0 = sum(p.numel() for p in model.parameters())
    plan = graph.removable(zero_rows(model, graph))
    removed = ChannelRemover(graph).remove(plan, [opt])
    with torch.no_grad():
        after = model(x)
    n1 = sum(p.numel() for p in model.parameters())
    return dict(name=name, model=model, opt=opt, graph=graph, before=before, after=after, removed=removed,
                params=n0, removed_pct=100.0 * (n0 - n1) / n0, trace_s=trace_s,
                frozen=sum(1 for g in graph.groups if g.frozen), groups=len(graph.groups),
                patterns=[r for r in graph.unsupported if r != "network output"],
                max_rel_diff=float((after - before).abs().max() / before.abs().max().clamp_min(1e-30)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, inputs 2x3x{args.size}x{args.size}, seed {args.seed}")
    print("| model | parameters | groups kept (frozen) / all | removed, every 2nd channel dead | most removable "
          "(all but one channel per group) | max rel. output diff | trace | kept because |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        t0 = time.perf_counter()
        half = removal_run(name, "half", args.size, args.seed)
        most = removal_run(name, "one", args.size, args.seed)
        diff = max(half["max_rel_diff"], most["max_rel_diff"])
        why = "; ".join(half["patterns"]) or "only the network output"
        print(f"| {name} | {half['params'] / 1e6:.2f}M | {half['frozen']} / {half['groups']} | {half['removed_pct']:.2f}% "
              f"| {most['removed_pct']:.2f}% | {diff:.1e} | {half['trace_s']:.1f} s | {why} |  ({time.perf_counter() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
