"""Switch AMSGrad (Reddi, Kale & Kumar) on and off on a live Adam/AdamW.

Adam divides by ``sqrt(v_t)``; AMSGrad keeps ``v̂_t = max(v̂_{t-1}, v_t)`` in
``state["max_exp_avg_sq"]`` and divides by ``sqrt(v̂_t)``. Flipping ``group["amsgrad"]`` on a
torch Adam that already has state raises ``KeyError: 'max_exp_avg_sq'`` at the next step
(fairseq#3965), because torch creates that tensor only when a parameter's state is first made.
:func:`set_amsgrad` flips the flag AND creates or drops the state.

Initialisation of ``max_exp_avg_sq`` when enabling: a copy of the current ``exp_avg_sq``.

* Before the first step torch itself initialises it to zeros, and ``exp_avg_sq`` is zeros too,
  so enabling at step 0 reproduces ``Adam(amsgrad=True)`` exactly (parameters without state are
  left to torch's own lazy initialisation, which is the same zeros).
* Mid-run, the true running maximum ``max_{s<=t} v_s`` is unknown (it was not tracked) but is at
  least ``v_t``; ``v_t`` is the tightest value we know, so AMSGrad proceeds from "the maximum
  since the switch". Zeros would instead ignore ``v_t`` and make the first step plain Adam.

Disabling drops ``max_exp_avg_sq`` (re-enabling later starts again from ``exp_avg_sq``).
"""

from __future__ import annotations

import torch

from pl_optim import checks
from pl_optim.steps import check_optimizers


def supports_amsgrad(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has an ``amsgrad`` option (torch Adam, AdamW, and third-party
    optimizers that declare ``amsgrad`` in their defaults)."""
    return "amsgrad" in getattr(optimizer, "defaults", {})


def check_amsgrad_support(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` naming the class unless ``optimizer`` has an ``amsgrad`` option."""
    check_optimizers([optimizer])
    if not supports_amsgrad(optimizer):
        raise ValueError(
            f"{type(optimizer).__name__} has no `amsgrad` option; AMSGrad can be switched on optimizers "
            "that declare it in their defaults, e.g. torch.optim.Adam and torch.optim.AdamW"
        )


def set_amsgrad(optimizer: torch.optim.Optimizer, enabled: bool) -> None:
    """Enable or disable AMSGrad in every param group of ``optimizer``, keeping the state valid.

    Enabling sets ``group["amsgrad"] = True`` and, for every parameter that already has state,
    ``state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()`` (see the module docstring for
    why); in a group that is already enabled an existing ``max_exp_avg_sq`` is kept (enabling
    twice changes nothing), in a disabled group a stale one is replaced. Disabling sets
    the flag to ``False`` and deletes ``max_exp_avg_sq``. Works for the single-tensor, foreach
    and fused implementations (they all read the same state).

    Args:
        optimizer: an optimizer with an ``amsgrad`` option (``torch.optim.Adam``/``AdamW``).
        enabled: the wanted setting.

    Raises:
        TypeError: not a ``torch.optim.Optimizer``; or ``enabled`` is not a bool.
        ValueError: the optimizer has no ``amsgrad`` option (e.g. SGD), or a parameter's state
            has no ``exp_avg_sq`` to start the maximum from.

    Example::

        opt = torch.optim.Adam(model.parameters())
        ...                                   # some steps of plain Adam
        set_amsgrad(opt, True)                # AMSGrad from the next step on
    """
    checks.boolean("enabled", enabled)
    check_amsgrad_support(optimizer)
    for group in optimizer.param_groups:
        was_enabled = bool(group.get("amsgrad", False))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            if not enabled:
                state.pop("max_exp_avg_sq", None)
            elif not was_enabled or "max_exp_avg_sq" not in state:
                if "exp_avg_sq" not in state:
                    raise ValueError(
                        f"{type(optimizer).__name__} state of a parameter has no 'exp_avg_sq' "
                        f"(keys: {sorted(state)}); cannot start the AMSGrad maximum"
                    )
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone(memory_format=torch.preserve_format)
        group["amsgrad"] = enabled


def amsgrad_enabled(optimizer: torch.optim.Optimizer) -> list[bool]:
    """``group["amsgrad"]`` of every param group (``False`` where the key is missing)."""
    return [bool(g.get("amsgrad", False)) for g in optimizer.param_groups]
