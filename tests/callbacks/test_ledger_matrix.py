"""Every step-driven callback x every way an optimizer's step() can be called (issue: one ledger).

For optimizers that compute the same maths as a plain ``torch.optim.Adam`` (a subclass calling
``super().step()`` with a plain Adam created first, a wrapper optimizer, the foreach and fused
implementations) the callback's trace and the final weights must equal the plain run's
(bit-identical where the kernels are the same). For optimizers without such a twin (LBFGS, a
hand-written third-party optimizer with its own state keys, torch's Adafactor) the traces must
equal the schedule evaluated at the steps that ran. And a ``training_step`` returning ``None``
leaves every callback's state and the weights untouched on that batch.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from examples.tiny import RandomClassificationData, TinyClassifier, TinyConvNet
from pl_optim.callbacks import AMSGradToggle, DecoupledWeightDecay, OneCycle, ParamScheduler, SelfCompression
from pl_optim.schedules import Cosine, one_cycle
from tests.core.test_steps import SubclassAdam, Wrapper

STEPS = 8
LR = 0.02


class ThirdParty(torch.optim.Optimizer):
    """A hand-written optimizer with its own state key: sign of a momentum buffer."""

    def __init__(self, params, lr=LR, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("signum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


def _plain(params, lr):
    return torch.optim.Adam(params, lr=lr)


def _subclass(params, lr):
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # torch now wraps Adam.step AND SubclassAdam.step
    return SubclassAdam(params, lr=lr)


OPTIMIZERS = {
    "plain": _plain,
    "subclass": _subclass,
    "wrapper": lambda params, lr: Wrapper(torch.optim.Adam(params, lr=lr)),
    "foreach": lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=True),
    "fused": lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True),
    "lbfgs": lambda params, lr: torch.optim.LBFGS(params, lr=lr, max_iter=2),
    "third_party": lambda params, lr: ThirdParty(params, lr=lr),
    "adafactor": lambda params, lr: torch.optim.Adafactor(params, lr=lr),
}
TWINS = {"subclass": "plain", "wrapper": "plain", "foreach": "plain", "fused": "plain"}
EXACT = {"subclass", "wrapper"}  # same kernels as plain: bit-identical; foreach/fused: allclose


def _module(kind: str, optimizer: str, lr: float):
    base = TinyConvNet if kind == "conv" else TinyClassifier

    class Module(base):
        def configure_optimizers(self):
            return OPTIMIZERS[optimizer](self.parameters(), lr)

    return Module(num_classes=3, **({"channels": (4, 4)} if kind == "conv" else {}))


def _conv_data():
    return RandomClassificationData(n=128, shape=(1, 8, 8), batch_size=16)


def _callback(name: str, optimizer: str):
    adam_like = optimizer in TWINS or optimizer == "plain"
    momentum = optimizer not in ("lbfgs", "adafactor")
    if name == "one_cycle":
        return OneCycle(0.05, cycle_momentum=momentum)
    if name == "param_scheduler":
        return ParamScheduler({"lr": Cosine(0.05, 0.001)})
    if name == "decoupled_decay":  # with lr=0 the decay is the only change: w0 * (1 - 0.1)^steps
        return DecoupledWeightDecay(0.1, mode="constant")
    if name == "amsgrad":
        return AMSGradToggle({0: False, 3: True}, interval="step") if adam_like else None
    if name == "self_compression":
        return SelfCompression(gamma=5.0, lr=0.5, remove_channels=True, plot_path=False)
    raise AssertionError(name)


class Probe(pl.Callback):
    """Records, at every batch start, the values the next step will use."""

    def __init__(self):
        self.trace = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        g = opt.param_groups[0]
        mom = g["betas"][0] if "betas" in g else g.get("momentum")
        self.trace.append((g["lr"], mom, g.get("amsgrad")))


def _run(name: str, optimizer: str, trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    callback = _callback(name, optimizer)
    kind = "conv" if name == "self_compression" else "mlp"
    model = _module(kind, optimizer, 0.0 if name == "decoupled_decay" else LR)
    w0 = [p.detach().clone() for p in model.parameters()]
    probe = Probe()
    trainer = pl.Trainer(max_steps=STEPS, limit_val_batches=0, callbacks=[callback, probe], **trainer_kwargs)
    data = _conv_data() if kind == "conv" else RandomClassificationData()
    trainer.fit(model, datamodule=data)
    return callback, model, probe.trace, w0


_CACHE: dict = {}


def _reference(name, trainer_kwargs):
    if name not in _CACHE:
        _CACHE[name] = _run(name, "plain", trainer_kwargs)
    return _CACHE[name]


ROWS = [
    (c, o)
    for c in ("one_cycle", "param_scheduler", "decoupled_decay", "amsgrad", "self_compression")
    for o in OPTIMIZERS
    if not (c == "amsgrad" and o in ("lbfgs", "third_party", "adafactor"))  # no amsgrad option: see below
    and not (c == "self_compression" and o in ("lbfgs", "adafactor"))  # see test_unsupported_pairs_fail_clearly
]


@pytest.mark.slow
@pytest.mark.parametrize("name,optimizer", ROWS)
def test_callback_acts_once_per_real_step(name, optimizer, trainer_kwargs):
    callback, model, trace, w0 = _run(name, optimizer, trainer_kwargs)
    positions = callback.step_positions()
    assert positions == [STEPS], f"{name} counted {positions} of {STEPS} steps with {optimizer}"
    if optimizer in TWINS:
        _, ref_model, ref_trace, _ = _reference(name, trainer_kwargs)
        assert trace == ref_trace
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert p.shape == q.shape
            if optimizer in EXACT:
                assert torch.equal(p, q), f"{optimizer} differs from plain Adam under {name}"
            else:
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        return
    lrs = [t[0] for t in trace]
    if name == "one_cycle":
        lr_s, mom_s = one_cycle(0.05)
        assert lrs == pytest.approx([lr_s(k, STEPS) for k in range(STEPS)], rel=1e-12)
        if optimizer == "third_party":
            assert [t[1] for t in trace] == pytest.approx([mom_s(k, STEPS) for k in range(STEPS)], rel=1e-12)
    elif name == "param_scheduler":
        assert lrs == pytest.approx([Cosine(0.05, 0.001)(k, STEPS) for k in range(STEPS)], rel=1e-12)
    elif name == "decoupled_decay":
        for p, p0 in zip(model.parameters(), w0):
            expected = p0 * 0.9**STEPS if p.ndim > 1 else p0
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    elif name == "self_compression":
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("optimizer,callback,match", [
    ("lbfgs", lambda: AMSGradToggle({0: True}), "amsgrad"),
    ("third_party", lambda: AMSGradToggle({0: True}), "amsgrad"),
    ("adafactor", lambda: AMSGradToggle({0: True}), "amsgrad"),
    ("adafactor", lambda: OneCycle(0.05), "neither `momentum` nor `betas`"),
    ("lbfgs", lambda: SelfCompression(gamma=1.0, lr=0.1), "per-parameter options|param group"),
])
def test_unsupported_pairs_fail_clearly(optimizer, callback, match, trainer_kwargs):
    model = _module("conv" if optimizer == "lbfgs" else "mlp", optimizer, LR)
    w0 = _weights(model)
    trainer = pl.Trainer(max_steps=2, callbacks=[callback()], **trainer_kwargs)
    data = _conv_data() if optimizer == "lbfgs" else RandomClassificationData()
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0
    after = _weights(model)
    assert all(torch.equal(after[name], w) for name, w in w0.items())  # no update happened


def _weights(model) -> dict[str, torch.Tensor]:
    """The model's own parameters by name (a quantiser parametrization's ``original`` under its
    plain name; the quantisers' bits/exponents left out)."""
    out = {}
    for name, p in model.named_parameters():
        plain = name.replace(".parametrizations.", ".").replace(".original", "")
        if not plain.endswith((".bits", ".exponent")) and ".0.bits" not in plain:
            out[plain] = p.detach().clone()
    return out


class SkipsSomeBatches(TinyConvNet):
    """``training_step`` returns None on the given batches (Lightning's documented skip)."""

    skip = {2, 5}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx in self.skip else loss


class Snapshots(pl.Callback):
    """Weights, param-group values and every callback's positions/state around each batch."""

    def __init__(self, watched):
        self.watched, self.before, self.after = watched, {}, {}

    def _state(self, trainer, pl_module):
        g = trainer.optimizers[0].param_groups
        return (
            [p.detach().clone() for p in pl_module.parameters()],
            [(x["lr"], x.get("weight_decay"), x.get("amsgrad"), x.get("betas")) for x in g],
            [cb.step_positions() if hasattr(cb, "step_positions") else None for cb in self.watched],
            [len(cb.removal.core.events) if getattr(cb, "removal", None) and cb.removal.core else 0 for cb in self.watched],
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[batch_idx] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = self._state(trainer, pl_module)


def _same(a, b) -> bool:
    weights_a, *rest_a = a
    weights_b, *rest_b = b
    return all(torch.equal(x, y) for x, y in zip(weights_a, weights_b)) and rest_a == rest_b


@pytest.mark.slow
def test_training_step_none_leaves_every_callback_and_the_weights_untouched(trainer_kwargs):
    callbacks = [
        ParamScheduler({"lr": Cosine(0.05, 0.001)}, optimizers=0),
        DecoupledWeightDecay(0.1),
        AMSGradToggle({0: False, 3: True}, interval="step"),
        SelfCompression(gamma=5.0, lr=0.5, remove_channels=True, plot_path=False),
    ]
    snaps = Snapshots(callbacks)
    model = SkipsSomeBatches(channels=(4, 4), num_classes=3, optimizer="adam", lr=LR)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=0, callbacks=[*callbacks, snaps],
                         **trainer_kwargs)
    trainer.fit(model, datamodule=_conv_data())
    for b in range(8):
        untouched = _same(snaps.before[b], snaps.after[b])
        assert untouched == (b in SkipsSomeBatches.skip), f"batch {b}: untouched={untouched}"
    assert all(cb.step_positions() == [6] for cb in callbacks)  # 8 batches, 2 of them skipped
    assert callbacks[2].step_positions() == [6] and trainer.optimizers[0].param_groups[0]["amsgrad"] is True
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
