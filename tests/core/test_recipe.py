"""The recipe checks (pure torch): broken models caught by the right check and no other, the
examples pass, nothing of the user's is touched, bad input is refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.data import DigitsDataModule
from examples.models import DigitsConvNet
from examples.tiny import RandomClassificationData, TinyClassifier, TinyConvNet
from pl_optim.recipe import CHECKS, check_batch_independence, check_final_bias, check_init_loss, run_recipe
from pl_optim.recipe.core import check_gradient_flow, check_input_baseline, check_overfit_batch


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x, y = dm.train_set.tensors
    return x[:64].contiguous(), y[:64].contiguous()


# -- the broken models -----------------------------------------------------------------------------
class BatchStandardise(nn.Module):
    """Meant per sample (``x.view(len(x), -1)``); ``view(-1)`` pools the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        return (x - flat.mean()) / flat.std()


class ConstantInput(nn.Module):
    """The net never sees the data (e.g. a placeholder input left in the forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


def mixing_view() -> nn.Module:
    m = DigitsConvNet()
    m.net.insert(0, BatchStandardise())
    return m


def huge_final_init() -> nn.Module:
    m = DigitsConvNet()
    with torch.no_grad():
        m.net[-1].weight.mul_(100.0)
    return m


def frozen_layer() -> nn.Module:
    m = DigitsConvNet()
    m.net[1][0].weight.requires_grad_(False)
    return m


def softmaxed_outputs() -> nn.Module:
    m = DigitsConvNet()
    m.net.append(nn.Softmax(dim=1))  # then F.cross_entropy applies log_softmax a second time
    return m


def dead_relus() -> nn.Module:
    m = DigitsConvNet()
    with torch.no_grad():
        m.net[1][1].bias[:48].fill_(-10.0)  # 48 of the 64 BN shifts before a ReLU: those units never fire
    return m


def ignores_inputs() -> nn.Module:
    m = DigitsConvNet()
    m.net.insert(0, ConstantInput())
    return m


def shuffled(y: torch.Tensor) -> torch.Tensor:
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]


BROKEN = [
    # (case, model factory, label transform, the checks that must not pass, status of each)
    ("view(-1) mixes the batch", mixing_view, None, {"batch_independence": "fail"}),
    ("final layer init x100", huge_final_init, None, {"init_loss": "fail"}),
    ("labels unrelated to the inputs", DigitsConvNet, shuffled, {"input_baseline": "warn"}),
    ("frozen conv that should train", frozen_layer, None, {"gradient_flow": "fail"}),
    ("loss on softmaxed outputs", softmaxed_outputs, None, {"overfit_batch": "fail"}),  # fix: "return logits"
    ("75% dead ReLUs", dead_relus, None, {"activations": "fail"}),
    # A net that never sees its inputs cannot overfit a batch either: two checks, both right.
    ("net ignores its inputs", ignores_inputs, None, {"input_baseline": "fail", "overfit_batch": "fail"}),
]


@pytest.mark.parametrize("case,make,labels,expected", BROKEN, ids=[c[0] for c in BROKEN])
def test_each_broken_model_is_caught_by_the_right_check_only(digits_batch, case, make, labels, expected):
    x, y = digits_batch
    report = run_recipe(make(), (x, labels(y) if labels else y))
    assert {r.name: r.status for r in report.results if not r.ok} == expected, report.table()
    for name in expected:
        assert report[name].fix, f"{name} gives no fix to try"
    if make is softmaxed_outputs:
        assert "already probabilities" in report["overfit_batch"].fix


GOOD = [
    ("DigitsConvNet", DigitsConvNet, "digits", {}),
    ("TinyConvNet on digits", lambda: TinyConvNet(num_classes=10), "digits", {"overfit_batch": {"steps": 60}}),
    # 195 parameters on a random linear teacher: a higher lr and more steps to overfit 64 samples.
    ("TinyClassifier", TinyClassifier, "tiny",
     {"input_baseline": {"optimizer": 3e-2}, "overfit_batch": {"optimizer": 3e-2, "steps": 60}}),
]


@pytest.mark.parametrize("case,make,data,options", GOOD, ids=[c[0] for c in GOOD])
def test_correct_examples_pass_every_check(digits_batch, case, make, data, options):
    batch = digits_batch if data == "digits" else next(iter(RandomClassificationData(batch_size=64).train_dataloader()))
    report = run_recipe(make(), batch, options=options)
    assert [r.status for r in report.results] == ["pass"] * len(CHECKS), report.table()
    assert "BatchNorm" in report["batch_independence"].detail or data == "tiny"


# -- nothing of the user's changes -----------------------------------------------------------------
def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple:
    return (copy.deepcopy(model.state_dict()), [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()), torch.get_rng_state().clone(), [m.training for m in model.modules()])


def _same(a: tuple, b: tuple) -> bool:
    sd_a, g_a, o_a, r_a, t_a = a
    sd_b, g_b, o_b, r_b, t_b = b
    same_sd = sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    same_g = all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(g_a, g_b))
    same_o = str(o_a) == str(o_b)
    return same_sd and same_g and same_o and torch.equal(r_a, r_b) and t_a == t_b


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("spec", ["adam", "user"])
def test_every_check_leaves_model_optimizer_and_rng_bit_identical(digits_batch, check, spec):
    x, y = digits_batch
    model = DigitsConvNet(channels=(8, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # optimizer state, gradients and BN running stats all exist
    model.net[1].eval()  # a mixed train/eval model: every flag must come back
    before = _snapshot(model, opt)
    options = {"optimizer": "user"} if spec == "user" and check in ("input_baseline", "overfit_batch") else {}
    run_recipe(model, (x, y), checks_to_run=[check], options={check: options}, user_optimizer=opt)
    assert _same(before, _snapshot(model, opt))
    model.net[0][1].running_mean.add_(1.0)  # the comparison itself can fail
    assert not _same(before, _snapshot(model, opt))


def test_checks_are_reproducible_whatever_the_global_rng(digits_batch):
    torch.manual_seed(1)
    a = run_recipe(DigitsConvNet(channels=(8, 8, 8)), digits_batch, checks_to_run=["overfit_batch", "input_baseline"])
    torch.manual_seed(1)
    m = DigitsConvNet(channels=(8, 8, 8))
    torch.rand(100)  # a different global RNG state when the checks start
    b = run_recipe(m, digits_batch, checks_to_run=["overfit_batch", "input_baseline"])
    assert [r.value for r in a.results] == [r.value for r in b.results]


# -- what each check reads -------------------------------------------------------------------------
def test_init_loss_is_log_c_for_zero_logits_and_regression_rule():
    x, y = torch.randn(32, 4), torch.randint(0, 5, (32,))
    zero = nn.Linear(4, 5)
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    r = check_init_loss(zero, (x, y))
    assert r.status == "pass" and r.value == pytest.approx(torch.log(torch.tensor(5.0)).item())
    # regression: the loss of predicting 0, i.e. mean(y^2) for MSE
    target = torch.randn(32, 1) * 3
    reg = nn.Linear(4, 1)
    nn.init.zeros_(reg.weight), nn.init.zeros_(reg.bias)
    r = check_init_loss(reg, (x, target), loss="mse")
    assert r.status == "pass" and r.value == pytest.approx(float((target ** 2).mean()), rel=1e-5)
    with torch.no_grad():
        reg.bias.fill_(50.0)
    assert check_init_loss(reg, (x, target), loss=nn.MSELoss()).status == "fail"


@pytest.mark.parametrize(
    "loss,target,bias,status",
    [
        ("cross_entropy", torch.tensor([0] * 58 + [1] * 6), [0.0, 0.0], "warn"),  # 90/10, bias uniform
        ("cross_entropy", torch.tensor([0] * 58 + [1] * 6), [0.0, -2.269], "pass"),  # bias = log priors
        ("bce_with_logits", torch.tensor([[1.0]] * 6 + [[0.0]] * 58), [0.0], "warn"),
        ("bce_with_logits", torch.tensor([[1.0]] * 6 + [[0.0]] * 58), [-2.269], "pass"),  # log(p / (1 - p))
        ("mse", torch.full((64, 1), 5.0) + torch.randn(64, 1), [0.0], "warn"),  # target mean 5, bias 0
        ("mse", torch.full((64, 1), 5.0) + torch.randn(64, 1), [5.0], "pass"),
    ],
)
def test_final_bias_against_priors_or_target_mean(loss, target, bias, status):
    layer = nn.Linear(3, len(bias))
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(bias))
    assert check_final_bias(layer, (torch.randn(64, 3), target), loss=loss).status == status


def test_final_bias_skipped_without_a_bias():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    r = check_final_bias(net, (torch.randn(8, 3), torch.randint(0, 2, (8,))))
    assert r.status == "skip" and "'2'" in r.detail


def test_batch_independence_train_mode_batchnorm_is_not_blamed(digits_batch):
    # BatchNorm mixes the batch in train mode; the check runs in eval mode and says so.
    r = check_batch_independence(DigitsConvNet(channels=(8, 8, 8)), digits_batch)
    assert r.status == "pass" and "BatchNorm" in r.detail and "train mode" in r.detail


def test_batch_independence_integer_inputs_are_skipped():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    r = check_batch_independence(net, (torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))))
    assert r.status == "skip" and "int64" in r.detail


def test_gradient_flow_allowed_frozen_and_missing_from_the_optimizer(digits_batch):
    m = frozen_layer()
    assert check_gradient_flow(m, digits_batch, allow_frozen=["net.1.0.*"]).status == "pass"
    opt = torch.optim.SGD(m.net[-1].parameters(), lr=0.1)  # forgets the conv layers
    r = check_gradient_flow(m, digits_batch, allow_frozen=["net.1.0.*"], user_optimizer=opt)
    assert r.status == "fail" and "not in the optimizer" in r.detail and "net.0.0.weight" in r.detail


def test_custom_forward_and_dict_batch():
    model = TinyClassifier()
    batch = {"features": torch.randn(16, 8), "label": torch.randint(0, 3, (16,))}
    r = check_init_loss(model, batch, forward=lambda m, x: m.net(x) * 0.0)
    assert r.value == pytest.approx(torch.log(torch.tensor(3.0)).item())


# -- bad input -------------------------------------------------------------------------------------
BAD = [
    (check_init_loss, ("a", "b"), {}, r"the batch's inputs must be a tensor, got a str: 'a'"),
    (check_init_loss, torch.randn(4, 8), {}, r"need a batch \(inputs, targets\) or a dict of them, got a Tensor"),
    (check_init_loss, {"pixels": torch.randn(4, 8)}, {}, r"cannot find the inputs and targets in a batch with keys \['pixels'\]"),
    (check_init_loss, (torch.randn(4, 8), torch.zeros(3)), {}, r"inputs \(4, 8\) and targets \(3,\)"),
    (check_init_loss, None, {"loss": "hinge"}, r"`loss` must be one of \('cross_entropy'.*got 'hinge'"),
    (check_init_loss, None, {"loss": lambda o, t: (o - t).abs().mean()}, r"cannot tell which task the loss '<lambda>'"),
    (check_init_loss, None, {"task": "ranking"}, r"`task` must be one of .*got 'ranking'"),
    (check_init_loss, None, {"tolerance": 0.0}, r"`tolerance` must be a positive finite number, got 0.0"),
    (check_final_bias, None, {"tolerance": -0.1}, r"`tolerance` must be a positive finite number or None, got -0.1"),
    (check_final_bias, None, {"priors": [0.5, 0.5]}, r"`priors` must be 3 non-negative class frequencies, got \[0.5, 0.5\]"),
    (check_input_baseline, None, {"margin": 0}, r"`margin` must be a positive finite number, got 0"),
    (check_input_baseline, None, {"steps": 0}, r"`steps` must be an integer >= 1, got 0"),
    (check_input_baseline, None, {"optimizer": -1e-3}, r"`optimizer` must be a positive finite number, got -0.001"),
    (check_input_baseline, None, {"optimizer": "sgd"}, r"`optimizer` must be an Adam lr \(> 0\), 'user' or a callable"),
    (check_overfit_batch, None, {"threshold": -0.05}, r"`threshold` must be a positive finite number, got -0.05"),
    (check_overfit_batch, None, {"optimizer": "user"}, r"`optimizer='user'` needs the user's optimizer"),
    (check_batch_independence, None, {"probes": 0}, r"`probes` must be an integer >= 1, got 0"),
    (CHECKS["activations"], None, {"dead_fraction": 0.0}, r"`dead_fraction` must be in \(0, 1\), got 0.0"),
]


@pytest.mark.parametrize("check,batch,kwargs,match", BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_input_is_refused_naming_the_value_model_untouched(check, batch, kwargs, match):
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,))) if batch is None else batch
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        check(model, batch, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_unknown_check_name_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"unknown recipe check\(s\) \['overfit'\]; available: \['init_loss'"):
        run_recipe(TinyClassifier(), (torch.randn(8, 8), torch.randint(0, 3, (8,))), checks_to_run=["overfit"])


def test_report_table_and_metrics(digits_batch):
    report = run_recipe(frozen_layer(), digits_batch, checks_to_run=["init_loss", "gradient_flow"])
    table = report.table()
    assert "[PASS] init_loss" in table and "[FAIL] gradient_flow" in table and "fix: frozen: unfreeze" in table
    assert "note: frozen: net.1.0.weight" in table
    assert table.splitlines()[-1] == "1 passed, 0 warned, 1 failed, 0 skipped"
    metrics = report.metrics()
    assert metrics["recipe/gradient_flow_status"] == 2.0 and metrics["recipe/init_loss_status"] == 0.0
    assert metrics["recipe/gradient_flow"] == 1.0
    assert [r.name for r in report.failed] == ["gradient_flow"]
