r"""Magnitude pruning masks that hold through every optimizer step that ran.

Iterative magnitude pruning (Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019):
after training, remove the fraction ``p`` of the *remaining* weights with the smallest
``|w|`` — across all prunable layers at once (``scope="global"``, open_lth's ``sparse_global``)
or layer by layer (``scope="layerwise"``, the paper's Lenet/Conv-2/4/6 experiments, where the
output layer is pruned at half the rate). Prunable weights are the ``weight`` tensors of
``Conv1d/2d/3d`` and ``Linear`` layers (biases and normalisation layers are kept, as in the
paper and open_lth).

A mask is a bool tensor shaped like its weight, ``True`` where the weight survives. Keeping a
pruned weight at exactly 0 is :class:`MaskSet`'s job, on the optimizer's
:class:`~pl_optim.steps.StepLedger`:

* before every update that runs: ``g ← g ⊙ m`` (no gradient flows into a pruned weight, so
  coupled L2 and the moments see 0 as well);
* right after it: ``w ← w ⊙ m`` and every optimizer state tensor shaped like ``w``
  (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``,
  ``sum``, ...) ``← s ⊙ m``, so neither momentum, nor decoupled decay, nor an optimizer
  that moves weights without a gradient (e.g. Adagrad's initial accumulator, noise) can revive
  them.

Nothing is reparametrised (unlike ``torch.nn.utils.prune``): the module keeps its plain
``weight`` parameters, a ``state_dict`` is the user's own, and the exported ticket is the model.

Example::

    weights = prunable_weights(model)
    masks = magnitude_masks(weights, 0.2)                 # 20% of the remaining weights, globally
    holder = MaskSet(weights, masks)
    holder.apply([optimizer])                            # zero the weights and their state now
    handle = holder.attach(optimizer)                    # ... and after every step that runs
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from pl_optim.checks import fraction, one_of, patterns
from pl_optim.steps import StepLedger, _Subscription, check_optimizers
from pl_optim.weight_decay import unmatched_patterns

Masks = dict[str, torch.Tensor]
SCOPES: tuple[str, ...] = ("global", "layerwise")
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_weights(
    model: nn.Module, layers: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters of the Conv/Linear layers to prune, by parameter name.

    Args:
        model: the network.
        layers: only layers whose module name matches one of these regular expressions
            (``re.search``); ``None``: every Conv/Linear layer.
        exclude: drop layers whose module name matches one of these.

    Returns:
        parameter name (``"net.0.0.weight"``) -> parameter, in module order.

    Raises:
        ValueError: no prunable layer is left, or a pattern matches no Conv/Linear layer (the
            message names the pattern and lists the prunable layers).
    """
    wanted, dropped = patterns("layers", layers), patterns("exclude", exclude)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, _PRUNABLE) and isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    if not candidates:
        raise ValueError(
            f"the model ({type(model).__name__}) has no prunable layers: pruning needs Conv1d/2d/3d or "
            "Linear layers with a `weight` parameter"
        )
    names = [n for n, _ in candidates]
    for arg, pats in (("layers", wanted), ("exclude", dropped)):
        for p in unmatched_patterns(pats, names):
            raise ValueError(f"`{arg}` pattern {p!r} matches no Conv/Linear layer; prunable layers: {names}")
    out = {
        f"{n}.weight" if n else "weight": m.weight for n, m in candidates
        if (not wanted or any(re.search(p, n) for p in wanted)) and not any(re.search(p, n) for p in dropped)
    }
    if not out:
        raise ValueError(f"`layers`={layers!r} with `exclude`={exclude!r} leaves no layer to prune; prunable: {names}")
    return out


def check_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> Masks:
    """Masks as bool tensors on each weight's device, checked against ``weights``.

    Raises:
        ValueError: a mask for a weight that is not there, a missing mask, or a shape mismatch.
    """
    extra = sorted(set(masks) - set(weights))
    if extra:
        raise ValueError(f"masks for parameters the model does not prune: {extra}; prunable: {list(weights)}")
    missing = [n for n in weights if n not in masks]
    if missing:
        raise ValueError(f"no mask for the prunable parameters {missing}")
    out = {}
    for name, w in weights.items():
        m = torch.as_tensor(masks[name])
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(f"mask of {name!r} has shape {tuple(m.shape)}, the weight {tuple(w.shape)}")
        out[name] = m.to(device=w.device, dtype=torch.bool)
    return out


def ones_masks(weights: Mapping[str, torch.Tensor]) -> Masks:
    """Masks that keep everything (the dense network)."""
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}


def _keep_largest(scores: torch.Tensor, alive: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Of the ``alive`` entries of the flat ``scores``, drop the ``n_prune`` smallest (ties: the
    earlier index goes first, deterministic). Returns the new flat mask."""
    out = alive.clone()
    if n_prune <= 0:
        return out
    idx = alive.nonzero().flatten()
    order = torch.argsort(scores[idx], stable=True)
    out[idx[order[:n_prune]]] = False
    return out


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    prune_fraction: float,
    masks: Mapping[str, torch.Tensor] | None = None,
    scope: str = "global",
    output_layer: str | None = None,
    output_fraction: float | None = None,
) -> Masks:
    r"""Prune ``prune_fraction`` of the remaining weights with the smallest ``|w|``.

    ``n = ceil(p · remaining)`` weights go (open_lth's count), chosen by ``|w|`` among those the
    current ``masks`` keep: over all layers at once (``"global"``) or ``ceil(p · remaining_l)`` in
    each layer (``"layerwise"``). The ``output_layer`` (a key of ``weights``) may use its own
    ``output_fraction`` (the paper prunes the output layer at half the rate); it is then pruned
    on its own, in both scopes.

    Args:
        weights: parameter name -> trained weight (from :func:`prunable_weights`).
        prune_fraction: ``p`` in (0, 1), of the weights still remaining.
        masks: the current masks (``None``: dense).
        scope: ``"global"`` or ``"layerwise"``.
        output_layer: key of ``weights`` pruned at ``output_fraction``.
        output_fraction: rate of the output layer in (0, 1) (``None``: ``prune_fraction``).

    Returns:
        the new masks (a subset of the old ones).

    Raises:
        ValueError: a bad fraction or scope, an ``output_layer`` not in ``weights``, or bad masks.
    """
    p = fraction("prune_fraction", prune_fraction)
    one_of("scope", scope, SCOPES)
    q = fraction("output_fraction", output_fraction, allow_none=True)
    if output_layer is not None and output_layer not in weights:
        raise ValueError(f"`output_layer` {output_layer!r} is not a pruned weight; pruned: {list(weights)}")
    current = check_masks(weights, masks) if masks is not None else ones_masks(weights)
    separate = output_layer is not None and q is not None
    new: Masks = {}
    with torch.no_grad():
        scores = {n: w.detach().abs().flatten().float().cpu() for n, w in weights.items()}
        alive = {n: current[n].flatten().cpu() for n in weights}
        pools: list[tuple[list[str], float]]
        rest = [n for n in weights if not (separate and n == output_layer)]
        if scope == "layerwise":
            pools = [([n], p) for n in rest]
        else:
            pools = [(rest, p)] if rest else []
        if separate:
            pools.append(([output_layer], q))
        for names, rate in pools:
            s = torch.cat([scores[n] for n in names])
            a = torch.cat([alive[n] for n in names])
            kept = _keep_largest(s, a, math.ceil(rate * int(a.sum())))
            for n, part in zip(names, kept.split([scores[n].numel() for n in names])):
                new[n] = part.view_as(weights[n]).to(weights[n].device)
    return {n: new[n] for n in weights}


def random_masks(masks: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> Masks:
    """Random masks with the same number of surviving weights in every layer as ``masks`` (the
    "random pruning" control of the paper and open_lth's ``randomly_prune`` branch)."""
    out = {}
    for name, m in masks.items():
        k = int(m.sum())
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=generator)[:k]] = True
        out[name] = flat.view_as(m).to(m.device)
    return out


def remaining(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of the weights kept, per mask and ``"total"`` (over all masks)."""
    out = {n: float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    out["total"] = sum(int(m.sum()) for m in masks.values()) / max(total, 1)
    return out


def _state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    state = optimizer.state.get(param) or {}
    return [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0 and v.shape == param.shape]


class MaskSet:
    """Masks bound to their parameters; keeps pruned weights at exactly 0.

    Args:
        weights: parameter name -> parameter (:func:`prunable_weights`).
        masks: parameter name -> bool mask shaped like the parameter.

    Raises:
        ValueError: masks that do not fit ``weights`` (see :func:`check_masks`).

    Example::

        holder = MaskSet(prunable_weights(model), masks)
        holder.apply([opt])
        handle = holder.attach(opt)      # handle.remove() to stop
    """

    def __init__(self, weights: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
        self.weights = dict(weights)
        self.masks = check_masks(self.weights, masks)
        self._pairs = [(self.weights[n], self.masks[n]) for n in self.weights]
        self._cache: dict[int, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def _pairs_of(self, optimizer: torch.optim.Optimizer | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if optimizer is None:
            return self._pairs
        size = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._cache.get(id(optimizer))
        if cached is None or cached[0] != size:  # a param group added since: look again
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            cached = self._cache[id(optimizer)] = (size, [(w, m) for w, m in self._pairs if id(w) in held])
        return cached[1]

    def mask_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``g ← g ⊙ m`` for the masked parameters (of ``optimizer`` only, when given)."""
        for w, m in self._pairs_of(optimizer):
            if w.grad is not None:
                w.grad.masked_fill_(~m, 0)

    def apply(self, optimizers: Iterable[torch.optim.Optimizer] = (), grads: bool = True) -> None:
        """``w ← w ⊙ m`` and the same for every optimizer state tensor shaped like ``w`` (and the
        gradient, when ``grads``)."""
        optimizers = list(optimizers)
        with torch.no_grad():
            for w, m in self._pairs:
                w.masked_fill_(~m, 0)
                if grads and w.grad is not None:
                    w.grad.masked_fill_(~m, 0)
                for opt in optimizers:
                    for s in _state_tensors(opt, w):
                        s.masked_fill_(~m.to(s.device), 0)

    def mask_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """``w ← w ⊙ m`` and the same for ``optimizer``'s state tensors shaped like ``w``, for the
        masked parameters ``optimizer`` holds (what runs after each update)."""
        with torch.no_grad():
            for w, m in self._pairs_of(optimizer):
                w.masked_fill_(~m, 0)
                for s in _state_tensors(optimizer, w):
                    s.masked_fill_(~m.to(s.device), 0)

    def attach(self, optimizer: torch.optim.Optimizer) -> _Subscription:
        """Mask gradients before and weights/state after every step of ``optimizer`` that runs
        (its :class:`~pl_optim.steps.StepLedger`). Returns the handle (``.remove()``)."""
        (optimizer,) = check_optimizers([optimizer])
        return StepLedger.of(optimizer).subscribe(before=self.mask_gradients, after=self.mask_weights)

    def remaining(self) -> dict[str, float]:
        """See :func:`remaining`."""
        return remaining(self.masks)
