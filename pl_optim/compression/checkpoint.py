"""Checkpoints of a self-compressing network that the user's unmodified, full-size model loads.

A network under training carries quantisers (``<layer>.parametrizations.weight.original`` /
``.0.bits`` / ``.0.exponent`` state-dict keys) and, after channel removal, fewer channels. Neither
loads into a freshly built model. This module converts between the two forms:

* :func:`plain_state_dict`: the state dict of the *plain, full-size* architecture -- every quantised
  layer's ``weight`` holds its quantised weight (``2^e n``), and every removed channel is exact zeros
  (weight rows and input columns, bias, BatchNorm shift and running mean; running variance 1), so the
  fresh model loading it (``strict=True``) computes exactly what the trained network computes: a removed
  channel's output was exactly 0 (its weights and constants were 0 when it went), and it is again.
* :func:`compressed_state`: what the plain form cannot hold -- the float latent weights, bit depths and
  exponents, and the channel indices kept -- as plain tensors; :func:`restore_compressed` puts a fresh
  full-size model (plain, or with quantisers attached) back into the exact training state from a plain
  state dict plus this.
* :func:`to_parametrized` renames a plain state dict's keys to the quantised layout in place (a
  ``load_state_dict`` pre-hook uses it), and :func:`shrink_to_state_dict` shrinks a full-size model to
  the shapes of a state dict saved after removals in the quantised layout (older checkpoints).

Example::

    torch.save({"model": plain_state_dict(net, removal.kept, removal.full),
                "compressed": compressed_state(net, removal.kept)}, "net.pt")
    fresh = Net(); fresh.load_state_dict(torch.load("net.pt")["model"])       # plain, same outputs
    restore_compressed(fresh, torch.load("net.pt")["compressed"])             # smaller, quantised again
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from pl_optim.compression.quantizer import ChannelQuantizer, initial_exponent, quantized_layers
from pl_optim.compression.surgery import Kept, apply_kept, match_shapes

_PARAM = "parametrizations.weight."
#: the tensors of a removed BatchNorm channel that are not 0 in the plain full-size state dict.
_FILL_ONE = ("running_var",)


def _base(name: str, prefix: str = "") -> str:
    return f"{prefix}{name}." if name else prefix


def shrink_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Shrink a full-size ``model`` to the shapes of a quantised-layout ``state_dict`` saved after channel
    removal (attaching quantisers it holds), so that ``model.load_state_dict(state_dict)`` fits; returns
    the layers shrunk (:func:`~pl_optim.compression.surgery.match_shapes`)."""
    return match_shapes(model, state_dict, prefix)


def _expand(t: torch.Tensor, dim: int, index: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    return out.index_copy_(dim, index.to(t.device), t)


def plain_state_dict(model: nn.Module, kept: Kept | None = None, full: Mapping[str, list[int]] | None = None) -> dict:
    """The state dict of the plain, full-size architecture (see the module docstring).

    Args:
        model: the network carrying quantisers (possibly shrunk by channel removal).
        kept: layer -> ``{"out": indices, "in": indices}`` of the full-size layers still there
            (:attr:`~pl_optim.compression.removal.ChannelRemoval.kept`); None or empty: nothing removed.
        full: layer -> full ``[out, in]`` sizes (:attr:`~pl_optim.compression.removal.ChannelRemoval.full`);
            required when ``kept`` is not empty.

    Returns:
        A new dict (tensors detached copies): keys and shapes of ``type(model)`` freshly built.

    Raises:
        ValueError: ``kept`` names a layer ``full`` does not size.
    """
    layers = quantized_layers(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, sep, _ = key.partition(_PARAM)
        if not sep:
            out[key] = value.detach().clone()
            continue
        name = head[:-1]
        if key == f"{head}{_PARAM}original" and name in layers:
            out[f"{head}weight"] = layers[name][0].weight.detach().clone()
    for name, entry in (kept or {}).items():
        if full is None or name not in full:
            raise ValueError(f"`full` gives no size for layer {name!r} of `kept`")
        size_out, size_in = full[name]
        base = _base(name)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            key = base + attr
            if key not in out or out[key].dim() == 0:
                continue
            fill = 1.0 if attr in _FILL_ONE else 0.0
            t = out[key]
            if "out" in entry:
                t = _expand(t, 0, entry["out"], size_out, fill)
            if attr == "weight" and "in" in entry and t.dim() > 1:
                t = _expand(t, 1, entry["in"], size_in, fill)
            out[key] = t
    return out


def compressed_state(model: nn.Module, kept: Kept | None = None) -> dict[str, Any]:
    """The training state the plain state dict cannot hold: ``{"quantizers": {key: tensor}, "kept": ...}``
    (every ``parametrizations.weight`` tensor of the quantised layers -- latent float weight, ``bits``,
    ``exponent``, ``float_numel`` -- at the current shapes; the kept indices)."""
    quantizers = {k: v.detach().clone() for k, v in model.state_dict().items() if _PARAM in k}
    return {"quantizers": quantizers, "kept": {n: {k: v.clone() for k, v in e.items()} for n, e in (kept or {}).items()}}


def restore_compressed(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Bring a full-size ``model`` holding a :func:`plain_state_dict` (plain, or with quantisers attached)
    to the exact state :func:`compressed_state` recorded: shrink it to the kept channels (same
    ``nn.Parameter`` objects), attach the quantisers it lacks, and write latent weights, bits and exponents.

    Returns:
        ``model``.

    Raises:
        ValueError: a layer of ``state`` is missing from ``model`` or does not have the recorded shape.
    """
    apply_kept(model, state.get("kept", {}))
    modules = dict(model.named_modules())
    quantizers = state.get("quantizers", {})
    for key in quantizers:
        if key.endswith(_PARAM + "original"):
            name = key[: -len("." + _PARAM + "original")] if key != _PARAM + "original" else ""
            if name not in modules:
                raise ValueError(f"layer {name!r} of the compressed state is not in the model")
            module = modules[name]
            if not parametrize.is_parametrized(module, "weight"):
                parametrize.register_parametrization(module, "weight", ChannelQuantizer(module.weight))
    with torch.no_grad():
        for key, value in quantizers.items():
            owner, _, attr = key.rpartition(".")
            target = getattr(model.get_submodule(owner), attr)
            if target.shape != value.shape:
                raise ValueError(f"{key!r}: the model has shape {tuple(target.shape)}, the state {tuple(value.shape)}")
            target.copy_(value)
    return model


def to_parametrized(model: nn.Module, state_dict: dict, prefix: str = "") -> list[str]:
    """Rename, in place, a plain state dict's ``<layer>.weight`` to the quantised layout of ``model``
    (``<layer>.parametrizations.weight.original``, the quantiser's tensors taken from ``model``, the
    exponent re-initialised from the loaded weight), so a model carrying quantisers loads it strictly.
    A float checkpoint loaded this way starts compressing from its weights; a
    :func:`restore_compressed` afterwards gives the exact training state.

    Returns:
        The layers converted.

    Raises:
        ValueError: a layer's size differs from the state dict's (load into a freshly built model).
    """
    done = []
    for name, (layer, q) in quantized_layers(model).items():
        base = _base(name, prefix)
        if base + "weight" not in state_dict or base + _PARAM + "original" in state_dict:
            continue
        weight = state_dict.pop(base + "weight")
        current = layer.parametrizations.weight.original
        if weight.shape != current.shape:
            raise ValueError(
                f"layer {name!r} has weight shape {tuple(current.shape)} but the checkpoint {tuple(weight.shape)}: "
                "load the checkpoint into a freshly built (full-size) model"
            )
        state_dict[base + _PARAM + "original"] = weight
        for key, value in q.state_dict().items():
            state_dict[f"{base}{_PARAM}0.{key}"] = value.detach().clone()
        init_bits = float(q.bits.detach().max()) if q.bits.numel() else 8.0
        state_dict[f"{base}{_PARAM}0.exponent"] = initial_exponent(weight, max(init_bits, 1e-3)).to(q.exponent.device)
        done.append(name)
    return done
