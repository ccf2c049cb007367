"""``precision_plugin(name)``: one name for every precision pl_optim supports, with clear errors."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins import HalfPrecision, MixedPrecision, Precision

from pl_optim.callbacks.precision_bf16 import PureBF16
from pl_optim.callbacks.precision_fp8 import Float8Training
from pl_optim.callbacks.precision_fp16 import LossScaledMixedPrecision

#: names accepted by :func:`precision_plugin`: pl_optim's plugins, then Lightning's own.
PRECISIONS = ("16-mixed", "bf16-pure", "fp8", "32-true", "bf16-mixed", "bf16-true")


def precision_plugin(name: str, **kwargs: Any) -> Precision:
    """Build the precision plugin called ``name``.

    * ``"16-mixed"``: :class:`LossScaledMixedPrecision` (fp16 + GradScaler, CPU or CUDA);
    * ``"bf16-pure"``: :class:`PureBF16` (bf16 params/grads/state, ``compensation=...``);
    * ``"fp8"``: :class:`Float8Training` (torchao float8, CUDA >= 8.9);
    * ``"32-true"``, ``"bf16-mixed"``, ``"bf16-true"``: Lightning's ``Precision``,
      ``MixedPrecision`` (``device=`` default ``"cpu"``) and ``HalfPrecision``.

    Args:
        name: one of :data:`PRECISIONS`.
        **kwargs: arguments of the plugin.

    Raises:
        ValueError: unknown ``name``; a ``scaler`` for a precision that does not scale the loss.

    Example::

        trainer = Trainer(plugins=[precision_plugin("bf16-pure", compensation="stochastic")])
    """
    if name not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {name!r}")
    if name != "16-mixed" and kwargs.get("scaler") is not None:
        raise ValueError(
            f"a `scaler` (loss scaling) is only for fp16: precision {name!r} does not overflow like fp16 and "
            "takes no GradScaler; use precision_plugin('16-mixed', scaler=...)"
        )
    if name != "16-mixed":
        kwargs.pop("scaler", None)
    if name == "16-mixed":
        return LossScaledMixedPrecision(**kwargs)
    if name == "bf16-pure":
        return PureBF16(**kwargs)
    if name == "fp8":
        return Float8Training(**kwargs)
    if name == "32-true":
        return Precision(**kwargs)
    if name == "bf16-mixed":
        return MixedPrecision("bf16-mixed", kwargs.pop("device", "cpu"), **kwargs)
    return HalfPrecision("bf16-true", **kwargs)


__all__ = ["PRECISIONS", "Float8Training", "LossScaledMixedPrecision", "PureBF16", "precision_plugin"]
