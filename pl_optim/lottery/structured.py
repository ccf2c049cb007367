r"""Structured lottery tickets: prune whole channels by weight norm and remove them for real.

Instead of masking single weights, each round drops the fraction ``p`` of the remaining output
channels of every removable channel group (the producers tied index by index by residual
additions, see :class:`~pl_optim.compression.graph.ChannelGraph`) whose weight rows have the
smallest norm — score of channel ``c`` of a group with producers ``P``:

.. math:: s_c = \sum_{l \in P} \frac{\lVert W_l[c] \rVert_1}{\#W_l[c]}\quad(\text{``l1''}),\qquad
          \sum_{l \in P} \frac{\lVert W_l[c] \rVert_2}{\sqrt{\#W_l[c]}}\quad(\text{``l2''})

(Li et al., "Pruning Filters for Efficient ConvNets", 2017, rank filters by their L1 norm).
The channels are then *removed* with the project's channel surgery
(:class:`~pl_optim.compression.surgery.ChannelRemover`: the producer's rows, the BatchNorm
entries, the consumers' input columns, and the optimizer state of all of them), so the ticket
is a genuinely smaller, faster dense network.

What survives is recorded as a :data:`~pl_optim.compression.surgery.Kept` record (layer ->
indices of the full-size layer), so a rewind point of the full-size network maps onto the
shrunk shapes with :func:`~pl_optim.compression.surgery.apply_kept` (weights AND optimizer
state sliced alike, scalar state such as Adam's ``step`` kept).

Example::

    kept = prune_channels(model, example, 0.2)            # model untouched; new record
    apply_kept(rewound_full_model, kept, [optimizer])     # the rewind point, shrunk
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from pl_optim.checks import fraction, one_of
from pl_optim.compression.graph import ChannelGraph
from pl_optim.compression.surgery import ChannelRemover, Kept

NORMS: tuple[str, ...] = ("l1", "l2")


def channel_scores(graph: ChannelGraph, norm: str = "l1") -> dict[int, torch.Tensor]:
    """Group index -> per-channel score (see the module docstring), for every removable group."""
    one_of("norm", norm, NORMS)
    out = {}
    with torch.no_grad():
        for i, g in enumerate(graph.groups):
            if g.frozen:
                continue
            total = torch.zeros(graph.group_size(i))
            for name in g.producers:
                rows = graph.modules[name].weight.detach().flatten(1).float().cpu()
                if norm == "l1":
                    total += rows.abs().sum(1) / rows.shape[1]
                else:
                    total += rows.norm(dim=1) / math.sqrt(rows.shape[1])
            out[i] = total
    return out


def channel_plan(
    graph: ChannelGraph, prune_fraction: float, scope: str = "layerwise", norm: str = "l1"
) -> dict[int, torch.Tensor]:
    """Channels to remove per group (local indices, as :meth:`ChannelRemover.remove` takes).

    ``"layerwise"``: ``ceil(p · C_g)`` lowest-scoring channels of each group ``g``; ``"global"``:
    ``ceil(p · ΣC_g)`` lowest over all groups, each group's scores divided by their mean (so
    layers of different scale compare). At least one channel of every group is kept.

    Raises:
        ValueError: a bad fraction, scope or norm, or no removable group (the message lists
            why each group is kept).
    """
    p = fraction("prune_fraction", prune_fraction)
    one_of("scope", scope, ("global", "layerwise"))
    scores = channel_scores(graph, norm)
    if not scores:
        reasons = sorted({r for g in graph.groups for r in g.frozen})
        raise ValueError(f"the model has no removable channel group (kept because of: {reasons})")
    plan: dict[int, torch.Tensor] = {}
    if scope == "layerwise":
        for i, s in scores.items():
            n = min(math.ceil(p * s.numel()), s.numel() - 1)
            if n > 0:
                plan[i] = torch.argsort(s, stable=True)[:n].sort().values
        return plan
    groups = list(scores)
    flat = torch.cat([scores[i] / scores[i].mean().clamp_min(1e-30) for i in groups])
    owner = torch.cat([torch.full((scores[i].numel(),), k) for k, i in enumerate(groups)])
    local = torch.cat([torch.arange(scores[i].numel()) for i in groups])
    n = math.ceil(p * flat.numel())
    left = {i: scores[i].numel() for i in groups}
    chosen: dict[int, list[int]] = {}
    for j in torch.argsort(flat, stable=True).tolist():
        if n == 0:
            break
        gi = groups[int(owner[j])]
        if left[gi] > 1:
            chosen.setdefault(gi, []).append(int(local[j]))
            left[gi] -= 1
            n -= 1
    return {i: torch.tensor(sorted(c), dtype=torch.long) for i, c in chosen.items()}


def prune_channels(
    model: nn.Module,
    example: tuple,
    prune_fraction: float,
    kept: Kept | None = None,
    scope: str = "layerwise",
    norm: str = "l1",
) -> Kept:
    """The removal record after one more round of channel pruning; ``model`` is left untouched.

    Args:
        model: the trained (possibly already shrunk) network.
        example: example input(s) for tracing, e.g. ``(x[:2],)``.
        prune_fraction: fraction of each group's remaining channels to remove.
        kept: the record ``model`` was shrunk with (``None``: full size).
        scope: ``"layerwise"`` or ``"global"`` (see :func:`channel_plan`).
        norm: ``"l1"`` or ``"l2"``.

    Returns:
        layer -> ``{"out"/"in": indices of the full-size layer kept}`` (apply with
        :func:`~pl_optim.compression.surgery.apply_kept`).
    """
    clone = copy.deepcopy(model)
    graph = ChannelGraph(clone, *example)
    remover = ChannelRemover(graph, kept)
    remover.remove(channel_plan(graph, prune_fraction, scope, norm))
    return remover.kept


def kept_to_lists(kept: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, list[int]]]:
    """A removal record as plain lists (JSON / checkpoint friendly)."""
    return {n: {k: [int(i) for i in v] for k, v in e.items()} for n, e in kept.items()}


def kept_from_lists(kept: Mapping[str, Mapping[str, list[int]]]) -> Kept:
    """Inverse of :func:`kept_to_lists`."""
    return {n: {k: torch.tensor(v, dtype=torch.long) for k, v in e.items()} for n, e in kept.items()}


def parameter_count(model: nn.Module) -> int:
    """Number of parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters())
