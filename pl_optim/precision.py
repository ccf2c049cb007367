"""Low-precision numerics for any ``torch.optim.Optimizer``: compensated bf16 updates, stochastic
rounding, non-finite-gradient skips and loss-scaler bookkeeping (pure torch, no Lightning).

**The problem.** With parameters stored in bfloat16 (8 significant bits), an update ``Δ`` with
``|Δ| < ulp(w)/2`` rounds back to ``w``: small learning rates (the long tail of 1cycle) and
decoupled decay ``lr·λ·w`` stop acting. **The fix** (for any optimizer): around every step that
counts (the :class:`~pl_optim.steps.StepLedger` rules) the optimizer's param groups hold a float32
stand-in for each low-precision parameter (its value, gradient and per-parameter optimizer state,
i.e. every state tensor shaped like it, in float32), the optimizer runs unchanged in float32, and the float32 result ``w'`` is stored back in
bfloat16 with one of

* ``"kahan"`` (Kahan summation): the stored value is ``w_lo = bf16(w' )`` and the rounding error
  ``c = bf16(w' − w_lo)`` is kept in a bf16 compensation buffer in the optimizer's state
  (``optimizer.state[p]["pl_optim_compensation"]``); the next step starts from ``w_lo + c``. The
  pair carries ~16 significant bits, so updates down to ~2^-16 of ``|w|`` accumulate.
* ``"stochastic"`` (stochastic rounding): ``w_lo = SR(w')`` rounds up with probability equal to
  the discarded fraction, so ``E[w_lo] = w'`` and small updates survive on average. No buffer; a
  seeded ``torch.Generator`` per device (saved by :meth:`CompensatedUpdate.state_dict`; the same
  seed on every DDP rank keeps replicas identical).
* ``"none"``: round to nearest (the update is computed in float32, then lost if too small).

Under ``"kahan"`` and ``"stochastic"`` the optimizer state is stored back with stochastic rounding
(round-to-nearest freezes EMAs whose per-step change is below 2^-9 relative, such as Adam's second
moment with β₂ = 0.999); under ``"none"`` to nearest.

Parameters that are already float32 (e.g. the bit depths of self-compression) are left alone, so a
model can mix dtypes. Because the compensation buffer lives in the optimizer state, checkpoints hold
it (``optimizer.state_dict()``) and channel surgery that slices per-parameter state slices it too.

Example::

    model = nn.Linear(8, 3).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    comp = CompensatedUpdate(opt, compensation="kahan")   # subscribe before other step hooks
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x.bfloat16()), y)
        loss.backward()
        guarded_step(opt)            # skips (and reports to the ledger) non-finite gradients
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pl_optim.checks import integer, one_of
from pl_optim.steps import StepLedger, check_optimizers

#: compensation modes of :class:`CompensatedUpdate`.
COMPENSATIONS: tuple[str, ...] = ("kahan", "stochastic", "none")
#: key of the Kahan compensation buffer in ``optimizer.state[p]``.
STATE_KEY = "pl_optim_compensation"
#: parameter dtypes the compensated update handles (stochastic rounding: bfloat16 only).
LOW_PRECISION = (torch.bfloat16, torch.float16)


# -- stochastic rounding ----------------------------------------------------------------------
def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round a float32 tensor to bfloat16 stochastically: up with probability equal to the part
    of the mantissa that is discarded, so that ``E[stochastic_round(x)] = x``.

    ``bits(x) + U[0, 2^16)`` then truncating the low 16 bits (bf16 is the top half of fp32).
    Non-finite values stay non-finite.

    Args:
        x: float32 tensor.
        generator: random generator on ``x``'s device (``None``: the global one).

    Returns:
        A bfloat16 tensor of ``x``'s shape.

    Raises:
        TypeError: ``x`` is not float32.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round rounds float32 to bfloat16, got a {x.dtype} tensor")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # 0xFFFF0000: keep the bf16 half
    return bits.view(torch.float32).to(torch.bfloat16)


def kahan_split(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a float32 tensor into ``(hi, lo)`` in ``dtype`` with ``hi = round(x)`` and
    ``lo = round(x − hi)``: ``hi + lo`` approximates ``x`` to about twice ``dtype``'s precision."""
    hi = x.to(dtype)
    return hi, (x - hi.float()).to(dtype)


# -- non-finite gradients -----------------------------------------------------------------------
def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any gradient of ``optimizer`` holds inf or NaN (one host sync)."""
    grads = _grads(optimizer)
    if not grads:
        return False
    norms = torch._foreach_norm([g.float() if g.dtype not in (torch.float32, torch.float64) else g for g in grads])
    return not bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]).sum()))


def guarded_step(optimizer: torch.optim.Optimizer, **kwargs: Any) -> bool:
    """``optimizer.step(**kwargs)`` unless a gradient is non-finite; a skipped step is reported
    with :meth:`StepLedger.note_skipped` (so nothing that counts steps advances).

    Returns:
        ``True`` if the step ran, ``False`` if it was skipped.
    """
    if nonfinite_gradients(optimizer):
        StepLedger.of(optimizer).note_skipped()
        return False
    optimizer.step(**kwargs)
    return True


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """After ``scaler.unscale_(optimizer)``: whether the scaler found inf/NaN gradients (so that
    ``scaler.step`` will skip ``optimizer.step()``, or a fused optimizer would skip internally)."""
    found = scaler._found_inf_per_device(optimizer)  # filled by unscale_ (torch's own record)
    return bool(sum(float(v.item()) for v in found.values()))


def check_scaler_optimizer(optimizer: torch.optim.Optimizer, feature: str) -> None:
    """Refuse optimizers whose ``step`` re-evaluates the closure (LBFGS): loss scaling and the
    finite-gradient check need the gradients once, before ``step``."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"{feature} does not support torch.optim.LBFGS (its step() re-evaluates the closure, so the "
            "gradients cannot be unscaled or checked once before the update); supported: optimizers whose "
            "step() updates from the existing gradients (SGD, Adam, AdamW, RMSprop, third-party ones)"
        )


# -- compensated update ---------------------------------------------------------------------------
class CompensatedUpdate:
    """Compensated low-precision updates for any optimizer (see the module docstring).

    Subscribes to the optimizer's :class:`~pl_optim.steps.StepLedger` on construction; create it
    BEFORE the other step hooks of the optimizer: its ``before`` upcasts first, so that the
    ``before`` hooks subscribed later (decoupled decay, the size gradient of self-compression) act
    on the float32 view; its ``after`` stores the result back first, so that later ``after`` hooks
    (schedules, channel removal) see the stored low-precision model.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (not LBFGS) over bf16/fp16 parameters
            (float32 parameters are stepped unchanged).
        compensation: ``"kahan"``, ``"stochastic"`` (bf16 only) or ``"none"``.
        seed: seed of the stochastic-rounding generators (same on every rank).
        attach: subscribe now (else call :meth:`attach`).

    Raises:
        ValueError: unknown ``compensation``, LBFGS, bad ``seed``.
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.

    Example::

        comp = CompensatedUpdate(opt, compensation="stochastic", seed=0)
        ...
        torch.save({"opt": opt.state_dict(), "comp": comp.state_dict()}, path)
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, compensation: str = "kahan", seed: int = 0, attach: bool = True
    ) -> None:
        (self.optimizer,) = check_optimizers([optimizer])
        self.compensation = one_of("compensation", compensation, COMPENSATIONS)
        self.seed = integer("seed", seed, minimum=0)
        check_scaler_optimizer(optimizer, "CompensatedUpdate")
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}
        self._active: list[tuple[dict, int, torch.Tensor, nn.Parameter]] = []
        self._shadows: dict[torch.Tensor, nn.Parameter] = {}
        self._handle = None
        if attach:
            self.attach()

    # -- wiring --------------------------------------------------------------------------------
    def attach(self) -> CompensatedUpdate:
        """Subscribe to the optimizer's ledger (idempotent)."""
        if self._handle is None:
            self._handle = StepLedger.of(self.optimizer).subscribe(before=self._begin, after=self._end)
        return self

    def detach(self) -> None:
        """Unsubscribe; parameters stay in low precision (idempotent)."""
        if self._active:
            self._end(self.optimizer)
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            if key in self._pending_states:
                gen.set_state(self._pending_states.pop(key))
            self._generators[key] = gen
        return gen

    # -- the two halves of a step ----------------------------------------------------------------
    def _shadow_of(self, p: torch.Tensor) -> nn.Parameter:
        shadow = self._shadows.get(p)
        if shadow is None:
            shadow = nn.Parameter(torch.empty(0), requires_grad=p.requires_grad)
            shadow._pl_optim_shadow_of = p  # type: ignore[attr-defined]  (see original_param)
            self._shadows[p] = shadow
        return shadow

    def _begin(self, optimizer: torch.optim.Optimizer) -> None:
        if self._active:  # a previous step raised between begin and end: store it back first
            self._end(optimizer)
        for group in optimizer.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p.grad is None or p.dtype not in LOW_PRECISION:
                    continue
                if self.compensation == "stochastic" and p.dtype != torch.bfloat16:
                    raise TypeError(f"compensation='stochastic' rounds to bfloat16; a parameter is {p.dtype}")
                full = p.detach().float()
                state = optimizer.state.pop(p, {})
                comp = state.get(STATE_KEY)
                if self.compensation == "kahan" and comp is not None and comp.shape == full.shape:
                    full.add_(comp)
                for key, value in state.items():
                    if key != STATE_KEY and _per_param(value, p) and value.dtype == p.dtype:
                        state[key] = value.float()
                shadow = self._shadow_of(p)
                shadow.data, shadow.grad = full, p.grad.float()
                if state:
                    optimizer.state[shadow] = state
                params[i] = shadow
                self._active.append((group, i, p, shadow))

    def _end(self, optimizer: torch.optim.Optimizer) -> None:
        for group, i, p, shadow in self._active:
            full = shadow.detach()
            state = optimizer.state.pop(shadow, {})
            if self.compensation == "kahan":
                low, comp = kahan_split(full, p.dtype)
                state[STATE_KEY] = comp
            else:
                low = self._round(full, p.dtype)
            for key, value in list(state.items()):
                if key != STATE_KEY and _per_param(value, p) and value.dtype == torch.float32:
                    state[key] = self._round_state(value, p.dtype)
            with torch.no_grad():
                p.copy_(low)  # in place: the parameter keeps its storage, dtype and autograd hooks (DDP's)
            if state:
                optimizer.state[p] = state
            if group["params"][i] is shadow:
                group["params"][i] = p
            shadow.data, shadow.grad = torch.empty(0), None  # free the fp32 view
        self._active = []

    def _round_state(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Optimizer state back to low precision: stochastically under both compensations (an EMA
        such as Adam's ``v ← β₂v + (1−β₂)g²`` with ``1−β₂ < 2^-8`` is frozen by round-to-nearest in
        bf16), to nearest under ``"none"``."""
        if self.compensation != "none" and dtype == torch.bfloat16:
            return stochastic_round(x, self.generator(x.device))
        return x.to(dtype)

    def _round(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.compensation == "stochastic":
            return stochastic_round(x, self.generator(x.device))
        return x.to(dtype)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The stochastic-rounding generator states (Kahan buffers live in the optimizer state)."""
        states = {k: g.get_state() for k, g in self._generators.items()}
        states.update({k: v for k, v in self._pending_states.items() if k not in states})
        return {"compensation": self.compensation, "seed": self.seed, "generators": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_states = dict(state.get("generators", {}))
        for key, gen in self._generators.items():
            if key in self._pending_states:
                gen.set_state(self._pending_states.pop(key))


def original_param(p: torch.Tensor) -> torch.Tensor:
    """The model parameter behind ``p``: during a compensated step the optimizer's param groups
    hold float32 stand-ins (so the model's parameters keep their dtype, storage and autograd hooks,
    which DDP's gradient reducer needs); code that identifies parameters (by name or ``id``) inside
    ``before`` hooks maps them back with this."""
    return getattr(p, "_pl_optim_shadow_of", p)


def _per_param(value: object, p: torch.Tensor) -> bool:
    """A per-parameter optimizer-state tensor: floating point and shaped like the parameter."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape and value.dim() > 0


# -- memory accounting ------------------------------------------------------------------------------
def held_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, float]:
    """Bytes held between steps by the parameters, gradients, optimizer state and compensation
    buffers of ``optimizers`` (each tensor counted once), and their sum per parameter element.

    Returns:
        ``{"params", "grads", "state", "compensation", "numel", "bytes_per_param"}``.
    """
    seen: set[int] = set()
    out = {"params": 0, "grads": 0, "state": 0, "compensation": 0, "numel": 0}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out[kind] += t.numel() * t.element_size()

    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                out["numel"] += p.numel()
                add("params", p)
                add("grads", p.grad)
                for key, value in opt.state.get(p, {}).items():
                    add("compensation" if key == STATE_KEY else "state", value)
    total = out["params"] + out["grads"] + out["state"] + out["compensation"]
    return {**{k: float(v) for k, v in out.items()}, "bytes_per_param": total / max(out["numel"], 1)}
