r"""The checks of Karpathy's "A Recipe for Training Neural Networks", as functions of a model, a
batch and a loss.

Each check returns a :class:`~pl_optim.recipe.report.CheckResult` (status, value, what was
expected, the fix to try) and leaves the model, any optimizer and the torch RNG bit-identical:
training happens on a clone (:class:`~pl_optim.recipe._setup.Clone`: cloned parameters and
buffers through ``torch.func.functional_call``), the RNG is forked and every ``training`` flag
is restored.

* :func:`check_init_loss` — the loss at initialisation vs. the loss of an all-zero output,
  :math:`\log C` for a :math:`C`-class softmax (``log 2`` per output for BCE, :math:`\overline{y^2}`
  for MSE: the rule for regression).
* :func:`check_final_bias` — the final layer's bias vs. the class priors of the batch
  (:math:`\mathrm{KL}(p\,\|\,\mathrm{softmax}(b))`), or the target mean for regression.
* :func:`check_input_baseline` — two clones trained on half the batch, with real and with zeroed
  inputs; the real one must do better on the other half.
* :func:`check_overfit_batch` — a clone must drive the loss on the batch below
  ``threshold`` × the zero-output loss within ``steps`` steps.
* :func:`check_batch_independence` — in eval mode, :math:`\partial \ell_i / \partial x_j = 0`
  for :math:`j \ne i` (backward of a random projection of output :math:`i`).
* :func:`check_gradient_flow` — parameters that are frozen, unused, get an all-zero gradient or
  are missing from the optimizer.
* :func:`check_activations` — dead ReLU units (zero for every sample of the batch), per layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pl_optim import checks
from pl_optim.recipe._setup import (
    Clone,
    Loss,
    _float_target,
    executed_modules,
    isolated,
    matches,
    resolve_loss,
    split_batch,
    zero_output_loss,
)
from pl_optim.recipe.report import CheckResult, RecipeReport

DEFAULT_OPTIMIZER = ("adam", 3e-3)
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


@dataclass
class Prepared:
    """A model, the batch split into inputs/targets, the resolved loss and the run settings."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: Loss
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    seed: int = 0
    user_optimizer: torch.optim.Optimizer | None = None

    def clone(self) -> Clone:
        return Clone(self.model, self.forward)

    def loss_of(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(out.float(), _float_target(y, self.loss))


def prepare(
    model: nn.Module,
    batch: Any,
    loss: str | Callable[..., torch.Tensor] | Loss = "cross_entropy",
    task: str | None = None,
    input_key: str | int | None = None,
    target_key: str | int | None = None,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
    seed: int = 0,
    user_optimizer: torch.optim.Optimizer | None = None,
) -> Prepared:
    """Validate and bundle what every check needs (see :func:`run_recipe` for the arguments).

    Raises:
        ValueError: the batch has no tensor inputs/targets, the loss is unknown, a bad argument.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    x, y = split_batch(batch, input_key, target_key)
    return Prepared(model, x, y, resolve_loss(loss, task), forward, context or contextlib.nullcontext,
                    checks.integer("seed", seed), user_optimizer)


class _ArgumentsOnly(Exception):
    """Raised by :func:`_prepared` for :data:`_ARGUMENTS_ONLY`: the check's arguments were valid."""


_ARGUMENTS_ONLY = object()
_COMMON = ("task", "input_key", "target_key", "forward", "context", "seed", "user_optimizer")


def _prepared(model: nn.Module | Prepared, batch: Any, loss: Any, common: Mapping[str, Any]) -> Prepared:
    # Every check validates its own arguments first, then calls this: validate_options stops here.
    if model is _ARGUMENTS_ONLY:
        raise _ArgumentsOnly
    return model if isinstance(model, Prepared) else prepare(model, batch, loss, **common)


def validate_options(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Check ``options`` (check name -> keyword arguments) without running anything.

    Raises:
        ValueError: an unknown check, an unknown keyword, or a bad value (the check's own message).
    """
    import inspect

    for name, kwargs in options.items():
        if name not in CHECKS:
            raise ValueError(f"unknown recipe check {name!r}; available: {list(CHECKS)}")
        own = [k for k in inspect.signature(CHECKS[name]).parameters if k not in ("model", "batch", "loss", "common")]
        bad = [k for k in kwargs if k not in own]
        if bad:
            raise ValueError(f"`options[{name!r}]` has unknown keys {bad}; {name} takes {own}")
        try:
            CHECKS[name](_ARGUMENTS_ONLY, **kwargs)
        except _ArgumentsOnly:
            pass


# -- init loss -------------------------------------------------------------------------------------
def check_init_loss(model: nn.Module | Prepared, batch: Any = None, loss: Any = "cross_entropy",
                    tolerance: float = 0.5, **common: Any) -> CheckResult:
    """The loss at initialisation should be the loss of an all-zero output (``log C`` for softmax).

    Passes when :math:`|\\ell_0 - \\ell_{zero}| \\le` ``tolerance`` :math:`\\cdot \\ell_{zero}`;
    fails above (outputs too large at init), warns below (better than chance before training:
    a leak?).

    Args:
        model: the model (or a :class:`Prepared` bundle, then ``batch``/``loss`` are ignored).
        batch: ``(inputs, targets)`` or a dict of them.
        loss: a name of :data:`~pl_optim.recipe._setup.LOSSES` or a loss function/module.
        tolerance: allowed relative deviation (> 0).
        **common: ``task``, ``input_key``, ``target_key``, ``forward``, ``context``, ``seed``.

    Raises:
        ValueError: a non-positive ``tolerance`` or a batch/loss it cannot interpret.
    """
    tolerance = checks.positive("tolerance", tolerance)
    p = _prepared(model, batch, loss, common)
    with isolated(p.model, p.seed), torch.no_grad(), p.context():
        out = p.clone()(p.x)
        value = float(p.loss_of(out, p.y))
    ref = zero_output_loss(out, p.y, p.loss)
    rule = {"classification": f"log(C={out.shape[1]})", "binary": "log 2"}.get(p.loss.task, "loss of predicting 0")
    expected = f"{ref:.4g} = {rule} ± {tolerance:.0%}"
    if ref <= 0 or not math.isfinite(ref):
        return CheckResult("init_loss", "skip", value, expected, detail="the zero-output loss is 0: no reference")
    if not math.isfinite(value) or value > ref * (1 + tolerance):
        return CheckResult("init_loss", "fail", value, expected,
                           fix="outputs too large at init: scale down the final layer's init (or zero it), "
                               "check the loss receives raw logits/predictions",
                           detail=f"{value / ref:.2f}x the zero-output loss")
    if value < ref * (1 - tolerance):
        return CheckResult("init_loss", "warn", value, expected,
                           fix="better than chance before training: do targets leak into the inputs? "
                               "is the loss reduced/averaged as intended?")
    return CheckResult("init_loss", "pass", value, expected)


# -- final bias ------------------------------------------------------------------------------------
def _final_layer(p: Prepared, clone: Clone) -> tuple[str, torch.Tensor | None]:
    order = executed_modules(p.model, lambda: clone(p.x))
    if not order:
        return "", None
    name, _ = order[-1]
    key = f"{name}.bias" if name else "bias"
    return name, clone.params.get(key)


def check_final_bias(model: nn.Module | Prepared, batch: Any = None, loss: Any = "cross_entropy",
                     tolerance: float | None = None, priors: Sequence[float] | torch.Tensor | None = None,
                     **common: Any) -> CheckResult:
    """The final layer's bias should predict the label priors (regression: the target mean).

    Classification: :math:`\\mathrm{KL}(p \\,\\|\\, \\mathrm{softmax}(b))` with :math:`p` the
    batch's class frequencies (or ``priors``), allowed ``tolerance`` (default 0.1 nats) plus the
    sampling noise of the batch's counts, :math:`(C-1)/(2n)`. Binary: the mean per-output binary KL
    against :math:`\\sigma(b)`. Regression: :math:`\\max_k |b_k - \\bar y_k| / s_k` (default 0.5
    target standard deviations). Skipped when the last layer has no bias.

    Args:
        tolerance: allowed deviation (> 0), see above.
        priors: class priors to use instead of the batch's label frequencies.

    Raises:
        ValueError: a non-positive ``tolerance``, bad ``priors``, or a batch/loss it cannot interpret.
    """
    tolerance = checks.positive("tolerance", tolerance, allow_none=True)
    p = _prepared(model, batch, loss, common)
    with isolated(p.model, p.seed), torch.no_grad(), p.context():
        name, bias = _final_layer(p, p.clone())
    if bias is None:
        return CheckResult("final_bias", "skip", math.nan, "bias = priors",
                           detail=f"the last layer {name or type(p.model).__name__!r} has no bias")
    b, y, n = bias.detach().double().flatten(), p.y, p.y.shape[0]
    if p.loss.task == "classification":
        tol = 0.1 if tolerance is None else tolerance
        if priors is not None:
            prior = torch.as_tensor(priors, dtype=torch.float64).flatten()
        elif y.is_floating_point():  # soft labels (N, C, ...)
            prior = y.double().transpose(0, 1).flatten(1).mean(1) if y.ndim > 1 else None
        else:
            prior = torch.bincount(y.flatten().long(), minlength=b.numel()).double()
        if prior is None or prior.numel() != b.numel() or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError(f"`priors` must be {b.numel()} non-negative class frequencies, got {priors!r}")
        prior = prior / prior.sum()
        q = torch.softmax(b, 0)
        value = float((prior * (prior.clamp_min(1e-12) / q).log()).sum())
        allowed = tol + chi2_999(b.numel() - 1) / (2 * y.numel())
        expected = f"KL(priors || softmax(bias)) <= {allowed:.3g}"
        fix = f"initialise `{name}.bias` to log(priors): bias.copy_(priors.log()); priors {_few(prior)}"
    elif p.loss.task == "binary":
        tol = 0.1 if tolerance is None else tolerance
        prior = (torch.as_tensor(priors, dtype=torch.float64) if priors is not None
                 else y.double().reshape(n, -1).mean(0)).flatten().clamp(1e-4, 1 - 1e-4)
        if prior.numel() != b.numel():
            raise ValueError(f"`priors` must be {b.numel()} positive-label frequencies, got {priors!r}")
        q = torch.sigmoid(b)
        value = float((prior * (prior / q).log() + (1 - prior) * ((1 - prior) / (1 - q)).log()).mean())
        allowed = tol + chi2_999(1) / (2 * n)
        expected = f"binary KL(priors || sigmoid(bias)) <= {allowed:.3g}"
        fix = f"initialise `{name}.bias` to log(p/(1-p)) of the positive rates {_few(prior)}"
    else:
        tol = 0.5 if tolerance is None else tolerance
        yy = y.double().reshape(n, -1)
        if yy.shape[1] != b.numel():
            return CheckResult("final_bias", "skip", math.nan, "bias = target mean",
                               detail=f"{b.numel()} biases for {yy.shape[1]} target columns")
        mean, std = yy.mean(0), yy.std(0).clamp_min(1e-12)
        value = float(((b - mean).abs() / std).max())
        allowed = tol
        expected = f"|bias - mean(y)| / std(y) <= {allowed:.3g}"
        fix = f"initialise `{name}.bias` to the target mean {_few(mean)}"
    status = "pass" if value <= allowed else "warn"
    return CheckResult("final_bias", status, value, expected, fix="" if status == "pass" else fix)


def chi2_999(dof: int) -> float:
    r"""The 99.9% quantile of a chi-square with ``dof`` degrees of freedom (Wilson-Hilferty).

    :math:`2n\,\mathrm{KL}(\hat p \,\|\, p)` of ``n`` labels drawn from ``p`` is asymptotically
    chi-square with :math:`C-1` degrees of freedom: the batch's label noise that the bias check allows.
    """
    k = max(int(dof), 1)
    return k * (1 - 2 / (9 * k) + 3.0902 * math.sqrt(2 / (9 * k))) ** 3


def _few(t: torch.Tensor, k: int = 4) -> str:
    vals = ", ".join(f"{float(v):.3g}" for v in t[:k])
    return f"[{vals}{', ...' if t.numel() > k else ''}]"


# -- training a clone ------------------------------------------------------------------------------
def _train(p: Prepared, x: torch.Tensor, y: torch.Tensor, steps: int, optimizer: Any,
           stop_below: float | None = None) -> tuple[Clone, list[float]]:
    """Train a fresh clone ``steps`` steps on ``(x, y)``; the loss before each step (and after the last)."""
    clone = p.clone()
    opt = clone.optimizer(optimizer, p.user_optimizer)
    losses: list[float] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with p.context():
            loss = p.loss_of(clone(x), y)
        losses.append(float(loss.detach()))
        if stop_below is not None and losses[-1] <= stop_below or not math.isfinite(losses[-1]):
            return clone, losses
        loss.backward()
        opt.step()
    with torch.no_grad(), p.context():
        losses.append(float(p.loss_of(clone(x), y)))
    return clone, losses


def _check_optimizer(optimizer: Any) -> Any:
    if optimizer == "user" or callable(optimizer):
        return optimizer
    if isinstance(optimizer, (int, float)) and not isinstance(optimizer, bool):
        return ("adam", checks.positive("optimizer", optimizer))
    if isinstance(optimizer, tuple) and len(optimizer) == 2 and optimizer[0] == "adam":
        return ("adam", checks.positive("optimizer", optimizer[1]))
    raise ValueError(f"`optimizer` must be an Adam lr (> 0), 'user' or a callable params -> optimizer, got {optimizer!r}")


def check_input_baseline(model: nn.Module | Prepared, batch: Any = None, loss: Any = "cross_entropy",
                         steps: int = 10, margin: float = 0.02, optimizer: Any = DEFAULT_OPTIMIZER,
                         **common: Any) -> CheckResult:
    r"""Real inputs must beat an input-independent baseline (inputs set to zero).

    Two clones are trained ``steps`` steps on the even-indexed half of the batch, one on the real
    inputs and one on zeros. On the odd (held-out) half each clone's loss drops by a relative
    :math:`d = (\ell_{before} - \ell_{after}) / \ell_{before}`; the value is
    :math:`d_{real} - d_{zero}`, which must exceed ``margin`` (pass). When only the training half
    improves more with real inputs (the real clone memorises but does not generalise) the labels
    look unrelated to the inputs (shuffled separately, wrong column): warn. When not even the
    training half does, the net ignores its inputs (zeroed/constant/detached before the net): fail.
    Skipped when zeroed inputs give a non-finite loss (a net normalising by the input's std).

    Args:
        steps: training steps of each clone (>= 1).
        margin: required advantage of the real clone's relative held-out loss drop (> 0).
        optimizer: an Adam learning rate, ``("adam", lr)``, ``"user"`` (a copy of the user's
            optimizer class and param-group values; needs ``user_optimizer``) or a callable
            ``params -> optimizer``.

    Raises:
        ValueError: a bad argument, fewer than 4 samples, or a batch/loss it cannot interpret.
    """
    steps = checks.integer("steps", steps, minimum=1)
    margin = checks.positive("margin", margin)
    optimizer = _check_optimizer(optimizer)
    p = _prepared(model, batch, loss, common)
    if p.x.shape[0] < 4:
        raise ValueError(f"the input-independent baseline needs a batch of >= 4 samples, got {p.x.shape[0]}")
    xa, ya, xb, yb = (t.contiguous() for t in (p.x[0::2], p.y[0::2], p.x[1::2], p.y[1::2]))
    drop: dict[str, tuple[float, float]] = {}
    with isolated(p.model, p.seed):
        for kind, transform in (("real", lambda t: t), ("zero", torch.zeros_like)):
            torch.manual_seed(p.seed)  # same dropout masks for both
            with torch.no_grad(), p.context():
                before = float(p.loss_of(p.clone()(transform(xb)), yb))
            clone, losses = _train(p, transform(xa), ya, steps, optimizer)
            with torch.no_grad(), p.context():
                after = float(p.loss_of(clone(transform(xb)), yb))
            drop[kind] = (_relative_drop(before, after), _relative_drop(losses[0], losses[-1]))
    expected = f"held-out loss drop, real - zeroed inputs > {margin:.3g} after {steps} steps"
    extra = {"held_out_drop_real": drop["real"][0], "held_out_drop_zero": drop["zero"][0],
             "train_drop_real": drop["real"][1], "train_drop_zero": drop["zero"][1]}
    if not all(math.isfinite(v) for v in extra.values()):
        return CheckResult("input_baseline", "skip", math.nan, expected, extra=extra,
                           detail="non-finite loss with zeroed (or real) inputs: no baseline to compare with")
    value = drop["real"][0] - drop["zero"][0]
    detail = (f"relative loss drop on the held-out half {drop['real'][0]:.1%} (real inputs) vs "
              f"{drop['zero'][0]:.1%} (zeroed); on the training half {drop['real'][1]:.1%} vs {drop['zero'][1]:.1%}")
    if value > margin:
        return CheckResult("input_baseline", "pass", value, expected, detail=detail, extra=extra)
    if drop["real"][1] - drop["zero"][1] > margin:
        return CheckResult("input_baseline", "warn", value, expected,
                           fix="the net fits its training half but gains nothing on the other half: are the labels "
                               "unrelated to the inputs (shuffled separately, wrong label column)? else raise `steps`",
                           detail=detail, extra=extra)
    return CheckResult("input_baseline", "fail", value, expected,
                       fix="the net does as well without its inputs: check that the inputs reach the net (not "
                           "zeroed/constant/detached), that the forward uses them, or raise `steps`",
                       detail=detail, extra=extra)


def _relative_drop(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else math.nan


def _looks_like_probabilities(out: torch.Tensor) -> bool:
    if out.ndim < 2:
        return False
    sums = out.float().sum(1)
    return bool(out.min() >= 0 and out.max() <= 1 and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def check_overfit_batch(model: nn.Module | Prepared, batch: Any = None, loss: Any = "cross_entropy",
                        steps: int = 30, threshold: float = 0.05, optimizer: Any = DEFAULT_OPTIMIZER,
                        **common: Any) -> CheckResult:
    """A clone trained on this one batch must reach ``threshold`` × the zero-output loss
    (``0.05 log C`` by default) within ``steps`` steps.

    Args:
        steps: the step budget (>= 1); training stops as soon as the target is reached.
        threshold: target as a fraction of the zero-output loss (> 0).
        optimizer: see :func:`check_input_baseline`.

    Raises:
        ValueError: a bad argument or a batch/loss it cannot interpret.
    """
    steps = checks.integer("steps", steps, minimum=1)
    threshold = checks.positive("threshold", threshold)
    optimizer = _check_optimizer(optimizer)
    p = _prepared(model, batch, loss, common)
    with isolated(p.model, p.seed):
        with torch.no_grad(), p.context():
            out = p.clone()(p.x)
        target = threshold * zero_output_loss(out, p.y, p.loss)
        _, losses = _train(p, p.x, p.y, steps, optimizer, stop_below=target)
    value, used = losses[-1], min(len(losses), steps)
    expected = f"loss <= {target:.3g} within {steps} steps"
    extra = {"steps": float(used), "first_loss": losses[0]}
    if value <= target:
        return CheckResult("overfit_batch", "pass", value, expected, detail=f"reached in {used} steps", extra=extra)
    if p.loss.task == "classification" and _looks_like_probabilities(out):
        fix = ("the outputs are already probabilities (rows sum to 1) but cross-entropy applies log_softmax "
               "itself: return logits")
    else:
        fix = ("raise the lr or `steps`, turn off regularisation (dropout, weight decay, augmentation) for this "
               "test, check that the loss pairs outputs with the right targets")
    return CheckResult("overfit_batch", "fail", value, expected, fix=fix,
                       detail=f"{losses[0]:.4g} -> {value:.4g} in {used} steps", extra=extra)


# -- batch independence -----------------------------------------------------------------------------
def check_batch_independence(model: nn.Module | Prepared, batch: Any = None, loss: Any = "cross_entropy",
                             probes: int = 3, **common: Any) -> CheckResult:
    """Output :math:`i` must not depend on input :math:`j \\ne i`: with the model in eval mode,
    the gradient of a random projection of output :math:`i` w.r.t. the whole input batch must be
    zero outside row :math:`i`. The value is the share of that gradient's mass on other samples
    (0 when independent), worst over ``probes`` samples (first, middle, last, ...).

    BatchNorm in train mode mixes samples by design (batch statistics) — which is why the check
    runs in eval mode; the result says so when the model has BatchNorm layers.

    Args:
        probes: number of samples whose output is differentiated (>= 1; one backward each).

    Raises:
        ValueError: a bad argument or a batch/loss it cannot interpret.
    """
    probes = checks.integer("probes", probes, minimum=1)
    p = _prepared(model, batch, loss, common)
    n = p.x.shape[0]
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in p.model.modules())
    note = (f"checked in eval mode: the model's {norms} BatchNorm layer(s) mix samples in train mode by design "
            "(batch statistics)" if norms else "checked in eval mode")
    if not p.x.is_floating_point():
        return CheckResult("batch_independence", "skip", math.nan, "d out_i / d x_j = 0 for j != i",
                           detail=f"inputs are {p.x.dtype} (not differentiable); {note}")
    picks = sorted({round(k * (n - 1) / max(probes - 1, 1)) for k in range(min(probes, n))})
    gen = torch.Generator(device=p.x.device).manual_seed(p.seed)
    worst, mixed, own_zero = 0.0, set(), 0
    with isolated(p.model, p.seed):
        p.model.eval()
        x = p.x.detach().clone().requires_grad_(True)
        with p.context():
            out = p.clone()(x)
        for k, i in enumerate(picks):
            r = torch.randn(out[i].shape, generator=gen, device=out.device, dtype=torch.float32)
            (g,) = torch.autograd.grad((out[i].float() * r).sum(), x, retain_graph=k < len(picks) - 1, allow_unused=True)
            if g is None:
                own_zero += 1
                continue
            mass = g.detach().abs().flatten(1).sum(1).double()
            others = float(mass.sum() - mass[i])
            own_zero += int(mass[i] == 0)
            if others > 0:
                worst = max(worst, others / float(mass.sum()))
                mixed |= {j for j in range(n) if j != i and mass[j] > 0}
    expected = "d out_i / d x_j = 0 for j != i (share 0)"
    if own_zero == len(picks):
        note += "; note: output i does not depend on input i either"
    if worst == 0.0:
        return CheckResult("batch_independence", "pass", 0.0, expected, detail=note)
    return CheckResult("batch_independence", "fail", worst, expected,
                       fix="samples mix: look for view/reshape across the batch dimension (use permute/transpose), "
                           "statistics over the whole batch (x.view(-1).mean()), or pooling over dim 0",
                       detail=f"outputs {picks} depend on {len(mixed)} other sample(s); {note}",
                       extra={"mixed_samples": float(len(mixed))})


# -- gradient flow ---------------------------------------------------------------------------------
def check_gradient_flow(model: nn.Module | Prepared, batch: Any = None, loss: Any = "cross_entropy",
                        allow_frozen: Sequence[str] = (),
                        user_optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                        **common: Any) -> CheckResult:
    """Every parameter that should train gets a gradient: one backward on a clone, then lists
    the parameters that are frozen (``requires_grad=False``, unless they match a pattern of
    ``allow_frozen``), unused (no gradient), get an all-zero gradient, or (when the optimizer is
    known) are missing from it.

    Args:
        allow_frozen: fnmatch patterns of parameter names that are frozen on purpose (``"backbone.*"``).
        user_optimizer: the optimizer(s) that will train the model (to find parameters none of them has).

    Raises:
        ValueError: a batch/loss it cannot interpret.
    """
    patterns = [allow_frozen] if isinstance(allow_frozen, str) else list(allow_frozen)
    p = _prepared(model, batch, loss, common)
    user_optimizer = user_optimizer or p.user_optimizer
    optimizers = [user_optimizer] if isinstance(user_optimizer, torch.optim.Optimizer) else list(user_optimizer or [])
    in_opt = {id(q) for o in optimizers for g in o.param_groups for q in g["params"]} if optimizers else None
    with isolated(p.model, p.seed):
        clone = p.clone()
        with p.context():
            out = clone(p.x)
        trainable = {n: t for n, t in clone.params.items() if t.requires_grad}
        grads = torch.autograd.grad(p.loss_of(out, p.y), list(trainable.values()), allow_unused=True) if trainable else ()
    problems: dict[str, list[str]] = {"frozen": [], "unused": [], "zero gradient": [], "not in the optimizer": []}
    for n, q in p.model.named_parameters():
        if not q.requires_grad and not matches(n, patterns):
            problems["frozen"].append(n)
        if q.requires_grad and in_opt is not None and id(q) not in in_opt:
            problems["not in the optimizer"].append(n)
    for (n, _), g in zip(trainable.items(), grads):
        if g is None:
            problems["unused"].append(n)
        elif not bool(g.any()):
            problems["zero gradient"].append(n)
    found = {k: v for k, v in problems.items() if v}
    count = float(sum(len(v) for v in found.values()))
    expected = "every trainable parameter gets a non-zero gradient"
    if not found:
        return CheckResult("gradient_flow", "pass", 0.0, expected, detail=f"{len(trainable)} parameter tensors")
    fixes = {"frozen": "unfreeze (requires_grad_(True)) or list in `allow_frozen`",
             "unused": "the forward pass never uses them (dead branch? detach()?)",
             "zero gradient": "something upstream blocks the gradient (dead ReLUs, a multiply by 0, a clamp)",
             "not in the optimizer": "add them to configure_optimizers' param groups"}
    return CheckResult("gradient_flow", "fail", count, expected,
                       fix="; ".join(f"{k}: {fixes[k]}" for k in found),
                       detail="; ".join(f"{k}: {_names(v)}" for k, v in found.items()),
                       extra={k: float(len(v)) for k, v in found.items()})


def _names(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


# -- activations -----------------------------------------------------------------------------------
def check_activations(model: nn.Module | Prepared, batch: Any = None, loss: Any = "cross_entropy",
                      dead_fraction: float = 0.25, modules: Sequence[type[nn.Module]] = ACTIVATIONS,
                      **common: Any) -> CheckResult:
    """Dead ReLUs: a unit (a channel of a conv, a feature of a linear layer) is dead on the batch
    when its activation is 0 for every sample and position. Fails when a layer has more than
    ``dead_fraction`` dead units; the value is the worst layer's fraction. Per-layer mean, std and
    dead fraction (fastai's ``ActivationStats``) are in ``extra``. Module hooks only see
    ``nn.ReLU``-style modules, not ``F.relu`` calls.

    Args:
        dead_fraction: allowed share of dead units per layer, in (0, 1).
        modules: the activation module types to inspect.

    Raises:
        ValueError: a bad argument or a batch/loss it cannot interpret.
    """
    dead_fraction = checks.fraction("dead_fraction", dead_fraction)
    p = _prepared(model, batch, loss, common)
    stats: dict[str, tuple[float, float, float]] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.ndim >= 2:
                o = out.detach().float()
                alive = (o > 0).transpose(0, 1).flatten(1).any(1)
                stats[name] = (float(o.mean()), float(o.std()), 1.0 - float(alive.float().mean()))
        return fn

    targets = [(n, m) for n, m in p.model.named_modules() if isinstance(m, tuple(modules))]
    if not targets:
        return CheckResult("activations", "skip", math.nan, f"dead units <= {dead_fraction:.0%} per layer",
                           detail=f"no {'/'.join(t.__name__ for t in modules)} modules (F.relu calls are invisible)")
    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    try:
        with isolated(p.model, p.seed), torch.no_grad(), p.context():
            p.clone()(p.x)
    finally:
        for h in handles:
            h.remove()
    worst_name, (_, _, worst) = max(stats.items(), key=lambda kv: kv[1][2])
    expected = f"dead units <= {dead_fraction:.0%} per layer"
    extra = {f"{n}/{k}": v for n, s in stats.items() for k, v in zip(("mean", "std", "dead"), s)}
    detail = f"worst layer {worst_name!r}: {worst:.0%} dead of {len(stats)} activation layers"
    if worst <= dead_fraction:
        return CheckResult("activations", "pass", worst, expected, detail=detail, extra=extra)
    return CheckResult("activations", "fail", worst, expected,
                       fix="units never activate: check the init (negative biases, huge scales), add normalisation "
                           "before the ReLU, lower the lr, or use LeakyReLU/GELU",
                       detail=detail, extra=extra)


# -- the bundle ------------------------------------------------------------------------------------
CHECKS: dict[str, Callable[..., CheckResult]] = {
    "init_loss": check_init_loss,
    "final_bias": check_final_bias,
    "input_baseline": check_input_baseline,
    "overfit_batch": check_overfit_batch,
    "batch_independence": check_batch_independence,
    "gradient_flow": check_gradient_flow,
    "activations": check_activations,
}


def run_recipe(
    model: nn.Module,
    batch: Any,
    loss: str | Callable[..., torch.Tensor] = "cross_entropy",
    checks_to_run: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **common: Any,
) -> RecipeReport:
    """Run the checks (all of :data:`CHECKS` by default) on one batch and collect the report.

    Args:
        model: the model; never modified.
        batch: ``(inputs, targets, ...)`` or a dict with input/target keys.
        loss: a loss name (``"cross_entropy"``, ``"bce_with_logits"``, ``"mse"``, ...) or a torch
            loss function/module; any other callable needs ``task``.
        checks_to_run: names of the checks to run, in this order.
        options: check name -> keyword arguments of that check (``{"overfit_batch": {"steps": 50}}``).
        **common: ``task``, ``input_key``, ``target_key``, ``forward`` (``forward(model, x)``),
            ``context`` (a context-manager factory around every forward, e.g. autocast), ``seed``,
            ``user_optimizer``.

    Returns:
        a :class:`RecipeReport`.

    Raises:
        ValueError: an unknown check name or option, a bad option value, or a batch/loss it cannot
            interpret — before any check runs.

    Example::

        from examples.tiny import TinyClassifier
        report = run_recipe(TinyClassifier(), (torch.randn(32, 8), torch.randint(0, 3, (32,))))
        print(report.table())
    """
    names = list(CHECKS) if checks_to_run is None else list(checks_to_run)
    unknown = [n for n in names if n not in CHECKS] + [n for n in (options or {}) if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown recipe check(s) {unknown}; available: {list(CHECKS)}")
    validate_options(options or {})
    p = prepare(model, batch, loss, **common)
    report = RecipeReport()
    for name in names:
        report.results.append(CHECKS[name](p, **dict((options or {}).get(name, {}))))
    return report
