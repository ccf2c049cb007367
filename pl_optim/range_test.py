"""LR range test (Smith 2015/2017; fastai's ``lr_find``): an exponential lr sweep with a smoothed
loss, stopped at divergence, after which weights, buffers, optimizer state and the torch RNG are
restored bit for bit.

Step :math:`k` of :math:`n` uses, for param group :math:`g`,
:math:`\\eta_{k,g} = r_g\\, \\eta_{min} (\\eta_{max}/\\eta_{min})^{k/(n-1)}` where
:math:`r_g = \\text{lr}_g / \\text{lr}_0` keeps the groups' ratios (discriminative learning
rates); ``min_lr``/``max_lr`` refer to group 0. The loss is smoothed with a bias-corrected
exponential moving average :math:`a_k = \\beta a_{k-1} + (1-\\beta) \\ell_k`,
:math:`\\bar\\ell_k = a_k / (1-\\beta^{k+1})`; the sweep stops when
:math:`\\bar\\ell_k > d \\cdot \\min_{j<k} \\bar\\ell_j` or the loss is not finite.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pl_optim.checks import positive
from pl_optim.param_groups import write_field
from pl_optim.report import Table

SUGGESTIONS = ("min_div_10", "steepest")


@dataclass
class RangeTestResult:
    """What a sweep measured.

    Attributes:
        lrs: lr of param group 0 at every step that ran.
        losses: raw losses.
        smoothed: bias-corrected smoothed losses.
        ratios: ``lr_g / lr_0`` of every param group (kept during the sweep).
        diverged: the sweep stopped early because the loss diverged.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=lambda: [1.0])
    diverged: bool = False

    def suggestion(self, method: str = "min_div_10") -> float:
        """Suggested lr of group 0.

        ``"min_div_10"`` (fastai's rule of thumb): the lr of the lowest smoothed loss divided by 10.
        ``"steepest"``: the lr where the smoothed loss falls fastest per unit of log-lr, between
        the first 10% of the points (where the average is still warming up) and its minimum.

        Raises:
            ValueError: an unknown method, or fewer than 3 finite points were measured.
        """
        if method not in SUGGESTIONS:
            raise ValueError(f"`suggestion` must be one of {SUGGESTIONS}, got {method!r}")
        pts = [(lr, s) for lr, s in zip(self.lrs, self.smoothed) if math.isfinite(s)]
        if len(pts) < 3:
            raise ValueError(f"the LR range test measured {len(pts)} finite losses; need >= 3 (raise `num_steps`/`max_lr`?)")
        best = min(range(len(pts)), key=lambda i: pts[i][1])
        if method == "min_div_10":
            return pts[best][0] / 10.0
        start = max(1, len(pts) // 10)  # the first points only show the average warming up
        end = max(best, start + 1)
        slopes = {i: (pts[i + 1][1] - pts[i - 1][1]) / math.log(pts[i + 1][0] / pts[i - 1][0])
                  for i in range(start, min(end, len(pts) - 1))}
        return pts[min(slopes, key=slopes.__getitem__)][0]

    def warning(self, method: str = "min_div_10") -> str | None:
        """Why the suggestion should not be trusted, with what to change; ``None`` when it sits inside
        the sweep.

        A suggestion below the first lr (``min_lr``) or at the first points means the smoothed loss
        never fell inside the sweep's start: lower ``min_lr`` or give the sweep more steps. A minimum
        at the last lr of a sweep that did not diverge means the loss was still falling: raise
        ``max_lr``. The Lightning callback warns with this text; raw-torch users can print it.
        """
        pts = [lr for lr, s in zip(self.lrs, self.smoothed) if math.isfinite(s)]
        if len(pts) < 3:
            return None
        lr, first, last = self.suggestion(method), pts[0], pts[-1]
        best = min((s, i) for i, s in enumerate(self.smoothed[: len(pts)]))[1]
        factor = (pts[1] / pts[0]) if pts[0] > 0 else math.nan
        where = f"suggested lr {lr:.3g} ({method})"
        if lr < first * (1 - 1e-9) or lr <= pts[max(1, len(pts) // 10)]:
            return (
                f"the {where} sits at or below the start of the sweep (`min_lr`={first:.3g}): the smoothed loss "
                f"was lowest at lr {pts[best]:.3g}, point {best + 1} of {len(pts)}, so the sweep saw no range in which "
                f"the loss fell. Lower `min_lr`, or raise `num_steps` (each step multiplies the lr by {factor:.3g} "
                f"here; the loss average needs tens of steps to settle), or lower `smoothing`."
            )
        if not self.diverged and (best == len(pts) - 1 or lr >= last * (1 - 1e-9)):
            return (
                f"the {where} sits at the end of the sweep: the smoothed loss was still falling at the last lr "
                f"{last:.3g} (`max_lr`) and never diverged. Raise `max_lr` (or `num_steps`) so the sweep "
                f"reaches the lr where the loss blows up."
            )
        return None

    def table(self) -> Table:
        """The sweep as a :class:`~pl_optim.report.Table`: ``step``, ``lr``, ``loss``, ``smoothed``."""
        rows = [{"step": k, "lr": lr, "loss": loss, "smoothed": s}
                for k, (lr, loss, s) in enumerate(zip(self.lrs, self.losses, self.smoothed))]
        status = "diverged" if self.diverged else "did not diverge"
        return Table(rows, formats={"lr": ".3g"}, title=f"LR range test: {len(rows)} steps, {status}")

    def suggestions(self, method: str = "min_div_10") -> list[float]:
        """The suggestion for every param group (group 0's times each group's ratio)."""
        lr = self.suggestion(method)
        return [lr * r for r in self.ratios]

    def plot(self, path: str | Path, method: str = "min_div_10") -> Path | None:
        """Save smoothed (and raw) loss vs. lr (log scale) as a PNG; ``None`` without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        with contextlib.suppress(ValueError):
            ax.axvline(self.suggestion(method), color="red", linestyle="--", label=f"suggestion ({method})")
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite and self.smoothed and math.isfinite(self.smoothed[0]):  # keep late spikes from flattening the curve
            ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), 1.5 * max(self.smoothed[0], min(finite)))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (param group 0)")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@contextlib.contextmanager
def suspended_step_hooks(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Detach the optimizer's own step pre/post hooks for the duration (so the sweep's steps are
    invisible to schedulers, decoupled decay, ...). Global ``torch.optim`` hooks stay."""
    saved = optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks
    optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = saved


def _clone(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


@contextlib.contextmanager
def restored(modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Snapshot weights, buffers, gradients, optimizer state and param-group values and the torch CPU RNG;
    put them back bit for bit on exit. Everything is restored *in place*: the same parameter,
    buffer, state-dict and param-group objects, so references held by other code stay valid."""
    weights = [copy.deepcopy(m.state_dict()) for m in modules]
    state = {p: {k: _clone(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        for m, w in zip(modules, weights):
            m.load_state_dict(w)
        optimizer.state.clear()
        optimizer.state.update(state)
        for g, saved in zip(optimizer.param_groups, groups):
            for k in [k for k in g if k != "params" and k not in saved]:
                del g[k]
            for k, v in saved.items():
                if isinstance(g.get(k), torch.Tensor) and isinstance(v, torch.Tensor):
                    g[k].copy_(v)  # e.g. a tensor lr: keep the object
                else:
                    g[k] = v
        for p, grad in zip(params, grads):
            p.grad = grad
        torch.set_rng_state(rng)


def check_range_args(min_lr: float, max_lr: float, num_steps: int, smoothing: float, diverge_threshold: float) -> None:
    """Validate the sweep's arguments (``ValueError`` naming the argument and echoing the value)."""
    for name, v in (("min_lr", min_lr), ("max_lr", max_lr), ("diverge_threshold", diverge_threshold)):
        positive(name, v)
    if max_lr <= min_lr:
        raise ValueError(f"`max_lr` must be > `min_lr` ({min_lr!r}), got {max_lr!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"`num_steps` must be an integer >= 3, got {num_steps!r}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing!r}")
    if diverge_threshold <= 1.0:
        raise ValueError(f"`diverge_threshold` must be > 1, got {diverge_threshold!r}")


def lr_range_test(
    loss_fn: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    modules: Sequence[nn.Module],
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_threshold: float = 4.0,
) -> RangeTestResult:
    """Run the sweep, then restore everything (see :func:`restored`).

    Args:
        loss_fn: ``loss_fn(k)`` runs the forward pass on batch ``k`` and returns the scalar loss.
        optimizer: the optimizer to sweep (its step hooks are suspended meanwhile).
        modules: modules whose parameters and buffers are restored afterwards.
        min_lr: first lr of param group 0.
        max_lr: last lr of param group 0.
        num_steps: steps of the sweep (fewer if the loss diverges).
        smoothing: :math:`\\beta` of the loss average.
        diverge_threshold: stop when the smoothed loss exceeds this multiple of its minimum.

    Returns:
        a :class:`RangeTestResult`.

    Raises:
        ValueError: a bad argument.

    Example::

        result = lr_range_test(lambda k: F.cross_entropy(model(xs[k]), ys[k]), opt, [model])
        max_lr = result.suggestion()
    """
    check_range_args(min_lr, max_lr, num_steps, smoothing, diverge_threshold)
    groups = optimizer.param_groups
    result = RangeTestResult(ratios=[float(g["lr"]) / float(groups[0]["lr"]) for g in groups])
    avg, best = 0.0, math.inf
    with restored(modules, optimizer), suspended_step_hooks(optimizer):
        for k in range(num_steps):
            lr = min_lr * (max_lr / min_lr) ** (k / (num_steps - 1))
            for g, r in zip(groups, result.ratios):
                write_field(g, "lr", lr * r)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(k)
            value = float(loss.detach())
            result.lrs.append(lr)
            result.losses.append(value)
            if not math.isfinite(value):
                result.smoothed.append(math.nan)
                result.diverged = True
                break
            avg = smoothing * avg + (1 - smoothing) * value
            smooth = avg / (1 - smoothing ** (k + 1))
            result.smoothed.append(smooth)
            if k > 0 and smooth > diverge_threshold * best:
                result.diverged = True
                break
            best = min(best, smooth)
            loss.backward()
            optimizer.step()
    return result
