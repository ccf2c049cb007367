"""Per-output-channel learnable quantiser of Cséfalvay & Imber, "Self-Compressing Neural Networks".

Every output channel ``i`` of a conv/linear weight ``W`` gets a learnable bit depth ``b_i`` and
exponent ``e_i``; the layer computes with

    q(W_i) = 2^{e_i} * round(clamp(2^{-e_i} * W_i, -2^{b_i - 1}, 2^{b_i - 1} - 1)),   b_i <- max(b_i, 0)

``round`` has a straight-through gradient (1), so gradients reach ``W`` (inside the clamp range),
``e`` (through both powers of two) and ``b`` (through the clamp bounds, for weights that are
clipped). ``b`` is real-valued; it enters through ``relu(b)`` so that it is effectively >= 0.

**Dead-channel rule** (used by size counting, export and channel removal alike,
:func:`dead_channels`): channel ``i`` is dead iff ``b_i <= 0``. Then the clamp range is the
single point ``-1/2`` and ``round(-1/2) = 0`` (round half to even), so every quantised weight of
the channel is exactly 0 and ``relu`` stops all gradient to ``b_i``: a dead channel stays dead.
(For ``0 < b_i < 1`` weights can still quantise to ``-2^{e_i}``, so such a channel is alive.)

The quantiser is attached with :mod:`torch.nn.utils.parametrize`, which keeps the layer's
weight ``nn.Parameter`` object (it becomes ``layer.parametrizations.weight.original``), so an
optimizer built before or after attaching sees the same tensor, and any code that reads
``layer.weight`` (``F.conv2d`` in ``forward``, user code, hooks) gets the quantised weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from pl_optim.checks import positive

#: Layer types that get a quantiser: output channels are dim 0 of their ``weight``.
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_init_bits(init_bits: float) -> float:
    return positive("init_bits", init_bits)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def quantize(weight: torch.Tensor, bits: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``2^e * round(clamp(2^-e * w, -2^(b-1), 2^(b-1) - 1))`` per output channel (dim 0).

    Args:
        weight: ``[C_out, ...]`` weight.
        bits: ``[C_out]`` bit depths (negative values act as 0).
        exponent: ``[C_out]`` exponents.

    Returns:
        The quantised weight, same shape and dtype as ``weight``, differentiable in all three
        inputs (straight-through ``round``).
    """
    shape = (-1,) + (1,) * (weight.dim() - 1)
    b = torch.relu(bits).reshape(shape)
    e = exponent.reshape(shape)
    half = torch.exp2(b - 1)
    x = torch.minimum(torch.maximum(torch.exp2(-e) * weight, -half), half - 1)
    return (torch.exp2(e) * ste_round(x)).to(weight.dtype)


def integer_codes(weight: torch.Tensor, bits: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """The integers ``round(clamp(2^-e * w, ...))`` of :func:`quantize` (no gradient), as int64."""
    with torch.no_grad():
        shape = (-1,) + (1,) * (weight.dim() - 1)
        half = torch.exp2(torch.relu(bits).reshape(shape) - 1)
        x = torch.minimum(torch.maximum(torch.exp2(-exponent.reshape(shape)) * weight, -half), half - 1)
        return torch.round(x).to(torch.int64)


def initial_exponent(weight: torch.Tensor, init_bits: float) -> torch.Tensor:
    """Exponents making the starting quantisation faithful: each channel's ``max|w|`` maps to the
    largest positive level ``2^(b0-1) - 1`` (to ``2^(b0-1)``, the negative end, when ``b0 <= 1``).

    ``e_i = log2(max|w_i|) - log2(L)``, ``L = 2^(b0-1) - 1`` if ``b0 > 1`` else ``2^(b0-1)``;
    an all-zero channel gets ``e = 0``. (Ports that start from ``e = -8`` clip every weight
    above ``2^(b0-1) * 2^-8`` and lose the float accuracy at step 0.)
    """
    with torch.no_grad():
        peak = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1).float()
        levels = 2.0 ** (init_bits - 1) - 1 if init_bits > 1 else 2.0 ** (init_bits - 1)
        return torch.where(peak > 0, torch.log2(peak.clamp_min(torch.finfo(torch.float32).tiny)) - math.log2(levels), 0.0)


class ChannelQuantizer(nn.Module):
    """Parametrization of a conv/linear ``weight``: learnable per-output-channel ``bits`` and
    ``exponent`` (float32 ``nn.Parameter`` of shape ``[C_out]``), forward = :func:`quantize`.

    Also holds a buffer ``float_numel``: the weight count of the layer when the quantiser was
    attached (the float model's size, the reference for "% of bits kept" even after channel
    removal shrinks the weight).

    Args:
        weight: the layer's weight (used for the shape and to initialise ``exponent``).
        init_bits: initial bit depth of every channel (> 0).

    Raises:
        ValueError: ``init_bits`` is not a positive finite number.
    """

    def __init__(self, weight: torch.Tensor, init_bits: float = 8.0) -> None:
        super().__init__()
        init_bits = check_init_bits(init_bits)
        c_out = weight.shape[0]
        self.bits = nn.Parameter(torch.full((c_out,), init_bits, dtype=torch.float32, device=weight.device))
        self.exponent = nn.Parameter(initial_exponent(weight, init_bits).to(weight.device))
        self.register_buffer("float_numel", torch.tensor(weight.numel(), dtype=torch.int64, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize(weight, self.bits, self.exponent)

    def extra_repr(self) -> str:
        return f"channels={self.bits.numel()}"


def dead_channels(quantizer: ChannelQuantizer) -> torch.Tensor:
    """Boolean ``[C_out]`` mask of dead channels: ``bits <= 0`` (all quantised weights are exactly 0)."""
    return quantizer.bits.detach() <= 0


def _check_model(model: nn.Module) -> None:
    if not any(isinstance(m, QUANTIZABLE) for m in model.modules()):
        raise ValueError(
            f"the model ({type(model).__name__}) has no Conv1d/Conv2d/Conv3d/Linear layer to quantise; "
            "self-compression supports exactly those layer types"
        )


def quantized_layers(model: nn.Module) -> dict[str, tuple[nn.Module, ChannelQuantizer]]:
    """Qualified layer name -> ``(layer, quantizer)`` for every layer carrying a
    :class:`ChannelQuantizer` on its ``weight``, in module order."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, ChannelQuantizer):
                    out[name] = (module, p)
    return out


def attach_quantizers(
    model: nn.Module, exclude: Iterable[str] = (), init_bits: float = 8.0
) -> dict[str, ChannelQuantizer]:
    """Register a :class:`ChannelQuantizer` on the ``weight`` of every conv/linear layer of
    ``model`` that is not excluded and not already quantised.

    The layer's weight ``nn.Parameter`` keeps its identity (it becomes
    ``layer.parametrizations.weight.original``); state-dict keys become
    ``<layer>.parametrizations.weight.original`` and ``<layer>.parametrizations.weight.0.bits`` /
    ``.exponent`` / ``.float_numel``.

    Args:
        model: the network.
        exclude: qualified layer names (as in ``model.named_modules()``) to leave in float; a
            name also excludes every layer under it.
        init_bits: initial bit depth (> 0).

    Returns:
        Qualified name -> quantiser of the layers attached by this call.

    Raises:
        ValueError: no conv/linear layer in ``model``, an ``exclude`` name matching no conv/linear
            layer, or a bad ``init_bits``.

    Example::

        attach_quantizers(net, exclude=["head"], init_bits=8)
        opt = torch.optim.Adam(net.parameters())   # weights, bits and exponents
    """
    init_bits = check_init_bits(init_bits)
    _check_model(model)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}

    def excluded(name: str) -> bool:
        return any(name == x or name.startswith(x + ".") for x in exclude)

    for x in exclude:
        if not any(name == x or name.startswith(x + ".") for name in layers):
            raise ValueError(
                f"`exclude` name {x!r} matches no Conv1d/Conv2d/Conv3d/Linear layer (exclude takes qualified layer "
                f"names or their prefixes, not regular expressions); layers are: {sorted(layers)}"
            )
    already = quantized_layers(model)
    attached = {}
    for name, layer in layers.items():
        if excluded(name) or name in already:
            continue
        quantizer = ChannelQuantizer(layer.weight, init_bits)
        parametrize.register_parametrization(layer, "weight", quantizer)
        attached[name] = quantizer
    return attached


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All ``bits`` and ``exponent`` parameters of ``model``'s quantisers, in module order."""
    return [p for _, q in quantized_layers(model).values() for p in (q.bits, q.exponent)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not a quantiser's ``bits``/``exponent`` (the optimizer's
    ordinary group, next to :func:`quantizer_param_groups`)."""
    ids = {id(p) for p in quantizer_parameters(model)}
    return [p for p in model.parameters() if id(p) not in ids]


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every ``bits``/``exponent`` tensor (see :func:`repair_nonfinite`)."""
    return [p.detach().clone() for p in quantizer_parameters(model)]


def round_bits(model: nn.Module) -> int:
    """Round every quantiser's bit depths to the nearest integer, in place (``round(max(b, 0))``, halves to
    even): the bit depths the packed file stores, so the size counted is the size written. Channels
    below half a bit become dead (``b = 0``). Meant for the moment the bit depths are frozen (the
    "integer bit depths at the end" of the literature); idempotent.

    Returns:
        The number of channels whose bit depth changed.
    """
    changed = 0
    with torch.no_grad():
        for _, q in quantized_layers(model).values():
            rounded = torch.round(q.bits.clamp_min(0))
            changed += int((rounded != q.bits).sum())
            q.bits.copy_(rounded)
    return changed


def _optimizer_entries(params: list[torch.Tensor], optimizers: Iterable[torch.optim.Optimizer]):
    for opt in optimizers:
        for p in params:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                    yield opt, p, key, value


def repair_nonfinite(
    model: nn.Module, previous: list[torch.Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()
) -> int:
    """Put back the previous value of every NaN/inf entry of ``bits``/``exponent``, and zero every
    NaN/inf entry of the optimizers' state tensors of those parameters (momentum buffers, Adam moments):
    a NaN left in a moment would turn the parameter NaN again at every later step.

    Args:
        model: the network.
        previous: :func:`snapshot` taken before the update.
        optimizers: the optimizers holding the quantiser parameters.

    Returns:
        The number of entries repaired, parameters and optimizer state together (0 when all finite).
    """
    repaired = 0
    params = quantizer_parameters(model)
    with torch.no_grad():
        for p, old in zip(params, previous):
            bad = ~torch.isfinite(p)
            if bad.any() and old.shape == p.shape:
                p[bad] = old[bad]
                repaired += int(bad.sum())
        for _, _, _, value in _optimizer_entries(params, optimizers):
            bad = ~torch.isfinite(value)
            if bad.any():
                value[bad] = 0
                repaired += int(bad.sum())
    return repaired


def clean_gradients(model: nn.Module) -> int:
    """Zero every NaN/inf entry of the ``bits``/``exponent`` gradients (before the optimizer step, so the
    optimizer's moments stay finite); returns how many entries were zeroed."""
    cleaned = 0
    with torch.no_grad():
        for p in quantizer_parameters(model):
            if p.grad is not None:
                bad = ~torch.isfinite(p.grad)
                if bad.any():
                    p.grad[bad] = 0
                    cleaned += int(bad.sum())
    return cleaned


def quantizer_param_groups(
    model: nn.Module, lr: float, exponent_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Param groups (dicts for ``torch.optim`` constructors or ``add_param_group``) of the quantiser
    parameters: ``bits`` and ``exponent`` in one group at ``lr``, or -- with ``exponent_lr`` -- the
    bits at ``lr`` and the exponents at ``exponent_lr`` in a second group. ``weight_decay`` 0: decay
    would pull the bit depths towards 0 outside the size loss.

    Example::

        attach_quantizers(net)
        opt = torch.optim.AdamW([{"params": weight_parameters(net)}, *quantizer_param_groups(net, 0.05, 0.01)], lr=3e-3)

    Raises:
        ValueError: ``lr`` or ``exponent_lr`` is not a positive number; ``model`` has no quantiser.
    """
    positive("lr", lr)
    positive("exponent_lr", exponent_lr, allow_none=True)
    params = quantizer_parameters(model)
    if not params:
        raise ValueError(f"the model ({type(model).__name__}) has no quantiser; call attach_quantizers first")
    if exponent_lr is None:
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]
    return [
        {"params": params[0::2], "lr": lr, "weight_decay": weight_decay},
        {"params": params[1::2], "lr": exponent_lr, "weight_decay": weight_decay},
    ]


def move_to_own_groups(
    optimizer: torch.optim.Optimizer, model: nn.Module, lr: float, exponent_lr: float | None = None
) -> list[dict]:
    """Take the quantiser parameters out of ``optimizer``'s groups (where present) and add
    :func:`quantizer_param_groups` to it; returns the groups added (``optimizer.param_groups`` entries).
    Their optimizer state, if any, is kept."""
    groups = quantizer_param_groups(model, lr, exponent_lr)
    ids = {id(p) for g in groups for p in g["params"]}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer.param_groups[-len(groups):]


def place_quantizers(
    optimizers: Sequence[torch.optim.Optimizer], model: nn.Module, index: int, lr: float | None = None,
    exponent_lr: float | None = None, default_lr: float = 0.05, default_exponent_lr: float = 0.01,
) -> list[tuple[dict, float]]:
    """Put the quantiser parameters where they train well, respecting a deliberate placement.

    Held in groups of their own (the user's choice) and neither lr given: left alone (returns ``[]``).
    Otherwise they move into :func:`move_to_own_groups` of the optimizer holding them (``optimizers[index]``
    when none does), at ``lr`` / ``exponent_lr`` (or the defaults). Returns ``(group, lr)`` per group added.

    Raises:
        RuntimeError: only some of them are in optimizers, or they are spread over several.
    """
    ids = {id(p) for p in quantizer_parameters(model)}
    holding = [(i, g) for i, opt in enumerate(optimizers) for g in opt.param_groups if any(id(p) in ids for p in g["params"])]
    held = {id(p) for _, g in holding for p in g["params"]} & ids
    holders = {i for i, _ in holding}
    if held and held != ids or len(holders) > 1:
        raise RuntimeError(
            "configure_optimizers put only some of the quantiser parameters (bits/exponent) into optimizers; "
            "supported: all of them in one optimizer, or none (SelfCompression then adds them)"
        )
    own = held and all(id(p) in ids for _, g in holding for p in g["params"])
    target = optimizers[next(iter(holders)) if held else index]
    if (own or isinstance(target, torch.optim.LBFGS) and held) and lr is None and exponent_lr is None:
        return []  # a deliberate placement; or LBFGS, which has exactly one group
    lr = default_lr if lr is None else lr
    exponent_lr = default_exponent_lr if exponent_lr is None else exponent_lr
    if isinstance(target, torch.optim.LBFGS):
        raise ValueError(
            "SelfCompression adds param groups for the bit depths/exponents, but LBFGS supports exactly one "
            "param group; put the quantiser parameters into the LBFGS group yourself (configure_optimizers: "
            "torch.optim.LBFGS(self.parameters())) and leave `lr`/`exponent_lr` at None, or use another optimizer"
        )
    groups = move_to_own_groups(target, model, lr, exponent_lr)
    return list(zip(groups, (lr, exponent_lr)))
