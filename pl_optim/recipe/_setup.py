"""What every recipe check shares: reading the batch, knowing the loss, working on a clone.

Nothing here touches the user's model: :class:`Clone` runs the model through
``torch.func.functional_call`` on cloned parameters and buffers, so training steps, BatchNorm
running statistics and gradients all land on the clone. :func:`isolated` additionally restores
the torch RNG (CPU and CUDA) and every module's ``training`` flag.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: loss names -> (function, task)
LOSSES: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "cross_entropy": (F.cross_entropy, "classification"),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, "binary"),
    "mse": (F.mse_loss, "regression"),
    "l1": (F.l1_loss, "regression"),
    "smooth_l1": (F.smooth_l1_loss, "regression"),
    "huber": (F.huber_loss, "regression"),
}
TASKS = ("classification", "binary", "regression")
_KNOWN: dict[object, str] = {fn: task for fn, task in LOSSES.values()}
_MODULES = {nn.CrossEntropyLoss: "classification", nn.BCEWithLogitsLoss: "binary", nn.MSELoss: "regression",
            nn.L1Loss: "regression", nn.SmoothL1Loss: "regression", nn.HuberLoss: "regression"}
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "data", "features")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


@dataclass(frozen=True)
class Loss:
    """A loss function and the task it implies (``"classification"``, ``"binary"``, ``"regression"``)."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    task: str
    name: str

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(output, target)


def resolve_loss(loss: str | Callable[..., torch.Tensor] | Loss, task: str | None = None) -> Loss:
    """Turn ``loss`` (a name of :data:`LOSSES`, a torch loss function or module, or any callable
    with ``task`` given) into a :class:`Loss`.

    Raises:
        ValueError: an unknown loss name, or a callable whose task cannot be inferred and no
            ``task`` (one of :data:`TASKS`) was given.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {tuple(LOSSES)} or a callable, got {loss!r}")
        fn, inferred = LOSSES[loss]
        return Loss(fn, task or inferred, loss)
    if not callable(loss):
        raise ValueError(f"`loss` must be one of {tuple(LOSSES)} or a callable, got {loss!r}")
    inferred = _KNOWN.get(loss) or next((t for cls, t in _MODULES.items() if isinstance(loss, cls)), None)
    if inferred is None and task is None:
        raise ValueError(
            f"cannot tell which task the loss {getattr(loss, '__name__', type(loss).__name__)!r} belongs to; "
            f"pass `task` (one of {TASKS}) or a known loss ({', '.join(LOSSES)})"
        )
    return Loss(loss, task or inferred, getattr(loss, "__name__", type(loss).__name__))


def split_batch(batch: Any, input_key: str | int | None = None, target_key: str | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a batch: a ``(x, y, ...)`` tuple/list or a dict with the keys
    ``input_key``/``target_key`` (default: the first of :data:`INPUT_KEYS`/:data:`TARGET_KEYS`).

    Raises:
        ValueError: the batch has no tensor input or target there, or fewer than 2 samples.
    """
    if isinstance(batch, Mapping):
        ik = input_key if input_key is not None else next((k for k in INPUT_KEYS if k in batch), None)
        tk = target_key if target_key is not None else next((k for k in TARGET_KEYS if k in batch), None)
        if ik not in batch or tk not in batch:
            raise ValueError(
                f"cannot find the inputs and targets in a batch with keys {sorted(map(str, batch))}; pass "
                f"`input_key`/`target_key` (tried {INPUT_KEYS} / {TARGET_KEYS})"
            )
        x, y = batch[ik], batch[tk]
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        x, y = batch[input_key or 0], batch[target_key if target_key is not None else 1]
    else:
        raise ValueError(
            f"the recipe checks need a batch (inputs, targets) or a dict of them, got a {type(batch).__name__}: "
            f"{_short(batch)}"
        )
    for what, t in (("inputs", x), ("targets", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"the batch's {what} must be a tensor, got a {type(t).__name__}: {_short(t)}")
    if x.ndim == 0 or x.shape[0] < 2 or y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"the batch needs >= 2 samples with one target each, got inputs {tuple(x.shape)} and targets {tuple(y.shape)}"
        )
    return x, y


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


class Clone:
    """The user's module run on its own copies of the parameters and buffers.

    ``clone(x)`` is ``model(x)`` with ``torch.func.functional_call``; the copies keep each
    parameter's ``requires_grad`` (frozen stays frozen). :meth:`optimizer` builds an optimizer
    over the trainable copies.

    Args:
        model: the user's module (never modified).
        forward: ``forward(model, x) -> output``; default ``model(x)``.
    """

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model
        self.forward = forward
        self.params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tensors = {**self.params, **self.buffers}
        if self.forward is None:
            return torch.func.functional_call(self.model, tensors, (x,), strict=False)
        return torch.func.functional_call(_Forward(self.model, self.forward), {f"m.{k}": v for k, v in tensors.items()}, (x,))

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    def optimizer(self, spec: Any, user: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
        """An optimizer over the clone: ``spec`` is ``("adam", lr)``, ``"user"`` (the class and
        param-group values of ``user``) or a callable ``params -> optimizer``."""
        if callable(spec):
            return spec(self.trainable())
        if spec == "user":
            if user is None:
                raise ValueError("`optimizer='user'` needs the user's optimizer; pass `user_optimizer`")
            names = {id(p): n for n, p in self.model.named_parameters()}
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [self.params[names[id(p)]] for p in g["params"] if id(p) in names and p.requires_grad]}
                      for g in user.param_groups]
            return type(user)([g for g in groups if g["params"]], **user.defaults)
        name, lr = spec
        return torch.optim.Adam(self.trainable(), lr=lr)


class _Forward(nn.Module):
    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.m, self._fn = model, forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self.m, x)


@contextlib.contextmanager
def isolated(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Restore the torch RNG (CPU + initialised CUDA devices) and every module's ``training``
    flag on exit; seed the RNG with ``seed`` inside so the checks are reproducible."""
    modes = [(m, m.training) for m in model.modules()]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


def zero_output_loss(output: torch.Tensor, target: torch.Tensor, loss: Loss) -> float:
    """The loss of an all-zero output: ``log C`` for softmax cross-entropy, ``log 2`` for
    BCE-with-logits, ``mean(y^2)`` for MSE — what a network whose outputs start near 0 scores."""
    return float(loss(torch.zeros_like(output, dtype=torch.float32), _float_target(target, loss)))


def _float_target(target: torch.Tensor, loss: Loss) -> torch.Tensor:
    return target if loss.task == "classification" and not target.is_floating_point() else target.float()


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` matches one of the fnmatch ``patterns`` (``"backbone.*"``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def executed_modules(model: nn.Module, run: Callable[[], Any]) -> list[tuple[str, nn.Module]]:
    """The leaf modules with parameters, in the order ``run()`` executed them."""
    order: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, mod)))
               for n, m in model.named_modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order
