"""pl_optim.lottery without a Trainer: masks, keeping pruned weights at 0, rewind points, export,
structured channel tickets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from pl_optim.compression.surgery import apply_kept
from pl_optim.lottery import (
    MaskSet,
    RewindPoint,
    channel_plan,
    encoding_bytes,
    export_ticket,
    magnitude_masks,
    prunable_weights,
    prune_channels,
    random_masks,
    reinitialize,
    remaining,
)
from pl_optim.weight_decay import DecoupledDecay


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 3),
    )


def _data(n: int = 32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# -- masks --------------------------------------------------------------------------------------
def test_prunable_weights_are_conv_and_linear_weights_in_module_order():
    assert list(prunable_weights(convnet())) == ["0.weight", "3.weight", "7.weight"]
    assert list(prunable_weights(mlp(), layers=r"^[02]$")) == ["0.weight", "2.weight"]
    assert list(prunable_weights(mlp(), exclude="4")) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("model, kwargs, match", [
    (nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), {}, "no prunable layers"),
    (mlp(), {"layers": "conv"}, "`layers` pattern 'conv' matches no Conv/Linear layer"),
    (mlp(), {"exclude": "fc9"}, "`exclude` pattern 'fc9' matches no"),
    (mlp(), {"layers": "("}, "not a valid regular expression"),
    (mlp(), {"exclude": ["0", "2", "4"]}, "leaves no layer to prune"),
    (mlp(), {"layers": 3}, "`layers` must be None, a name pattern"),
])
def test_prunable_weights_refuses(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prunable_weights(model, **kwargs)


def _reference_global(weights, p, masks):
    """open_lth's rule written independently: prune ceil(p * remaining) smallest |w| among survivors."""
    alive = torch.cat([w.abs().flatten()[masks[n].flatten()] for n, w in weights.items()])
    n = math.ceil(p * alive.numel())
    threshold = alive.sort().values[n - 1]
    return {k: (w.abs() > threshold) & masks[k] for k, w in weights.items()}


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_global_masks_match_reference_and_nest(p):
    weights = {k: v.detach() for k, v in prunable_weights(mlp()).items()}
    masks = magnitude_masks(weights, p)
    ref = _reference_global(weights, p, {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()})
    for k in weights:
        assert torch.equal(masks[k], ref[k]), k  # continuous weights: no ties
    again = magnitude_masks(weights, p, masks)
    total = sum(int(m.sum()) for m in masks.values())
    assert sum(int(m.sum()) for m in again.values()) == total - math.ceil(p * total)
    assert all(torch.equal(again[k] & ~masks[k], torch.zeros_like(masks[k])) for k in masks)  # subset


@pytest.mark.parametrize("scope, output_fraction, expected", [
    # 6*12=72, 12*8=96, 8*3=24 weights; p=0.5
    ("layerwise", None, {"0.weight": 36, "2.weight": 48, "4.weight": 12}),
    ("layerwise", 0.25, {"0.weight": 36, "2.weight": 48, "4.weight": 18}),
    ("global", 0.25, {"total_rest": 84, "4.weight": 18}),
])
def test_layerwise_and_output_layer_rates(scope, output_fraction, expected):
    weights = {k: v.detach() for k, v in prunable_weights(mlp()).items()}
    masks = magnitude_masks(weights, 0.5, scope=scope, output_layer="4.weight", output_fraction=output_fraction)
    for k, n in expected.items():
        got = int(masks["0.weight"].sum() + masks["2.weight"].sum()) if k == "total_rest" else int(masks[k].sum())
        assert got == n, k


def test_global_pruning_prefers_small_magnitude_layers():
    weights = {"a": torch.full((10,), 0.01) + torch.arange(10) * 1e-4, "b": torch.ones(10) + torch.arange(10) * 1e-3}
    masks = magnitude_masks(weights, 0.5)
    assert int(masks["a"].sum()) == 0 and int(masks["b"].sum()) == 10


@pytest.mark.parametrize("kwargs, match", [
    ({"prune_fraction": 0.0}, r"`prune_fraction` must be in \(0, 1\), got 0.0"),
    ({"prune_fraction": 1.0}, r"`prune_fraction` must be in \(0, 1\), got 1.0"),
    ({"prune_fraction": 0.2, "scope": "local"}, "`scope` must be one of"),
    ({"prune_fraction": 0.2, "output_layer": "nope"}, "`output_layer` 'nope' is not a pruned weight"),
    ({"prune_fraction": 0.2, "output_fraction": 2.0}, "`output_fraction` must be in"),
    ({"prune_fraction": 0.2, "masks": {"0.weight": torch.ones(3, 3, dtype=torch.bool)}}, "has shape"),
])
def test_magnitude_masks_refuses(kwargs, match):
    weights = {k: v.detach() for k, v in prunable_weights(mlp()).items()}
    if "masks" in kwargs:
        kwargs["masks"] = {**{k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}, **kwargs["masks"]}
    with pytest.raises(ValueError, match=match):
        magnitude_masks(weights, **kwargs)


def test_random_masks_keep_per_layer_counts():
    weights = {k: v.detach() for k, v in prunable_weights(mlp()).items()}
    masks = magnitude_masks(weights, 0.7, scope="global")
    rnd = random_masks(masks, torch.Generator().manual_seed(0))
    assert {k: int(m.sum()) for k, m in rnd.items()} == {k: int(m.sum()) for k, m in masks.items()}
    assert any(not torch.equal(rnd[k], masks[k]) for k in masks)
    assert remaining(rnd)["total"] == pytest.approx(remaining(masks)["total"])


# -- masks hold through every optimizer step ----------------------------------------------------------
OPTIMIZERS = [
    ("sgd-momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),  # + decoupled decay
    ("sgd-l2", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5)),
    ("amsgrad", lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True)),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9)),
    ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1)),
]


def _train(model, opt, steps, hook=None):
    x, y = _data()
    for i in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if hook is not None:
            hook(i)


@pytest.mark.parametrize("name, make", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
@pytest.mark.parametrize("attached", [True, False])
def test_pruned_weights_and_state_stay_exactly_zero(name, make, attached):
    model = mlp()
    weights = prunable_weights(model)
    opt = make(model.parameters())
    decay = DecoupledDecay(opt, 0.3, mode="lr") if name == "sgd-momentum" else None
    if decay is not None:
        decay.attach()
    _train(model, opt, 3)  # moments exist before pruning: they must be cleared too
    masks = magnitude_masks({k: v.detach() for k, v in weights.items()}, 0.6)
    holder = MaskSet(weights, masks)
    holder.apply([opt])
    if attached:
        holder.attach(opt)
    seen = []
    _train(model, opt, 5, hook=lambda i: seen.append(max(float(w.detach()[~masks[k]].abs().max()) for k, w in weights.items())))
    if not attached:  # the test can fail: without the ledger hooks momentum/decay revive them
        assert max(seen) > 0
        return
    assert max(seen) == 0.0
    for k, w in weights.items():
        for key, s in opt.state[w].items():
            if torch.is_tensor(s) and s.shape == w.shape:
                assert float(s[~masks[k]].abs().max()) == 0.0, (k, key)
        assert float(w[masks[k]].abs().min()) > 0  # the survivors train


@pytest.mark.parametrize("name, make", OPTIMIZERS[:2], ids=[n for n, _ in OPTIMIZERS[:2]])
def test_survivors_train_like_torch_prune(name, make):
    """Parity: the kept weights evolve exactly as with torch.nn.utils.prune (weight = orig * mask)."""
    ours, ref = mlp(), mlp()
    masks = magnitude_masks({k: v.detach() for k, v in prunable_weights(ours).items()}, 0.5)
    for i in (0, 2, 4):
        prune.custom_from_mask(ref[i], "weight", masks[f"{i}.weight"])
    opt_ours, opt_ref = make(ours.parameters()), make(ref.parameters())
    holder = MaskSet(prunable_weights(ours), masks)
    holder.apply([opt_ours])
    holder.attach(opt_ours)
    _train(ours, opt_ours, 6)
    _train(ref, opt_ref, 6)
    for i in (0, 2, 4):
        # ref's `weight` attribute is only recomputed at the next forward: compare orig * mask
        expected = ref[i].weight_orig * ref[i].weight_mask
        torch.testing.assert_close(ours[i].weight, expected, rtol=0, atol=1e-6)


# -- rewind points ---------------------------------------------------------------------------------
def test_rewind_point_restores_weights_optimizer_and_extras():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    decay = DecoupledDecay(opt, 0.1)
    decay.attach()
    _train(model, opt, 3, hook=lambda i: sched.step())
    point = RewindPoint.capture(model, [opt], {"sched": sched, "decay": decay}, step=3)
    _train(model, opt, 4, hook=lambda i: sched.step())
    straight = [p.detach().clone() for p in model.parameters()]
    point.restore(model, [opt], {"sched": sched, "decay": decay})
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    _train(model, opt, 4, hook=lambda i: sched.step())
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds 1 optimizer"):
        point.restore(model, [])
    with pytest.raises(ValueError, match="no state for"):
        point.restore(model, [opt], {"other": sched})


def test_reinitialize_is_seeded_and_leaves_global_rng_alone():
    a, b = convnet(0), convnet(0)
    state = torch.random.get_rng_state()
    reinitialize(a, 5)
    assert torch.equal(torch.random.get_rng_state(), state)
    reinitialize(b, 5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, convnet(0)[0].weight)


# -- export --------------------------------------------------------------------------------------
def test_export_is_a_plain_module_with_masks_folded():
    model = mlp()
    masks = magnitude_masks({k: v.detach() for k, v in prunable_weights(model).items()}, 0.75)
    model[0].weight.data.add_(1.0)  # pretend training left pruned entries non-zero
    out = export_ticket(model, masks)
    assert type(out) is nn.Sequential and not out.training
    assert not any("orig" in k or "mask" in k for k in out.state_dict())
    assert float(out[0].weight[~masks["0.weight"]].abs().max()) == 0.0
    assert float(model[0].weight[~masks["0.weight"]].abs().max()) > 0  # the original is untouched
    with pytest.raises(ValueError, match="not a parameter"):
        export_ticket(model, {"x.weight": masks["0.weight"]})


def test_encoding_bytes():
    model = nn.Linear(10, 4)  # weight 40, bias 4
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :2] = True  # 8 non-zero
    size = encoding_bytes(model, {"weight": mask})
    assert size.dense == 44 * 4
    assert size.csr == 8 * (4 + 4) + 5 * 4 + 4 * 4
    assert size.bitmap == 5 + 8 * 4 + 4 * 4
    assert size.nonzero == 12 and size.total == 44


# -- structured ----------------------------------------------------------------------------------
def test_channel_plan_drops_lowest_norm_channels():
    model = convnet()
    with torch.no_grad():
        model[0].weight[[1, 4]] *= 1e-3
    from pl_optim.compression.graph import ChannelGraph
    graph = ChannelGraph(model, torch.randn(2, 1, 8, 8))
    plan = channel_plan(graph, 0.3)  # ceil(0.3*6)=2 of conv 0, ceil(0.3*8)=3 of conv 3; output frozen
    first = next(i for i, g in enumerate(graph.groups) if "0" in g.producers)
    assert plan[first].tolist() == [1, 4]
    assert sum(len(v) for v in plan.values()) == 5


def test_prune_channels_maps_a_full_size_rewind_point_onto_the_shrunk_shapes():
    model = convnet()
    x = torch.randn(4, 1, 8, 8)
    kept = prune_channels(model, (x[:2],), 0.5)
    assert model[0].out_channels == 6  # untouched
    rewound = convnet()
    opt = torch.optim.Adam(rewound.parameters(), lr=0.01)
    nn.functional.cross_entropy(rewound(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    full_avg = opt.state[rewound[3].weight]["exp_avg"].clone()
    w = rewound[3].weight
    apply_kept(rewound, kept, [opt])
    assert rewound[0].out_channels == 3 and rewound[3].in_channels == 3 and rewound[3].out_channels == 4
    assert rewound[3].weight is w  # same Parameter object: the optimizer still holds it
    expected = full_avg[kept["3"]["out"]][:, kept["3"]["in"]]
    assert torch.equal(opt.state[w]["exp_avg"], expected)
    assert rewound(x).shape == (4, 3)
    opt.step()  # the optimizer keeps working on the shrunk shapes


@pytest.mark.parametrize("kwargs, match", [
    ({"prune_fraction": 1.5}, "`prune_fraction` must be in"),
    ({"prune_fraction": 0.5, "norm": "l3"}, "`norm` must be one of"),
])
def test_structured_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_channels(convnet(), (torch.randn(2, 1, 8, 8),), **kwargs)
    with pytest.raises(ValueError, match="no removable channel group"):
        prune_channels(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), (torch.randn(2, 1, 8, 8),), 0.5)
