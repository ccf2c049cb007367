"""fp8 training of ``nn.Linear`` layers with torchao's float8 on CUDA (compute capability >= 8.9)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from pl_optim import checks
from pl_optim.callbacks._precision import SkipBookkeeping, lightning_module
from pl_optim.precision import check_scaler_optimizer

#: minimum CUDA compute capability of fp8 matmuls (Ada / Hopper and newer).
MIN_CAPABILITY = (8, 9)
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def eligible_linears(model: nn.Module, multiple: int = 16) -> tuple[list[str], list[str]]:
    """Names of the ``nn.Linear`` layers fp8 matmuls can take (both dimensions divisible by
    ``multiple``), and a ``"name [out x in]"`` description of the others."""
    ok, refused = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if m.in_features % multiple == 0 and m.out_features % multiple == 0:
                ok.append(name)
            else:
                refused.append(f"{name or '<root>'} [{m.out_features} x {m.in_features}]")
    return ok, refused


def fp8_support(device: torch.device) -> str | None:
    """``None`` if fp8 training can run on ``device``, else the reason (device, capability, torchao)."""
    if device.type != "cuda":
        return f"fp8 training needs a CUDA device of compute capability >= 8.9; the model is on {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (
            f"fp8 training needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} ({device}) "
            f"has {cap[0]}.{cap[1]}"
        )
    if importlib.util.find_spec("torchao") is None:
        return "fp8 training needs torchao: pip install 'pl-optim[fp8]'"
    return None


class Float8Training(SkipBookkeeping, MixedPrecision):
    """bf16 autocast with the eligible ``nn.Linear`` layers converted to torchao's float8 training
    (``torchao.float8.convert_to_float8_training``) at setup; refuses anything but a CUDA device
    of compute capability >= 8.9 with a message naming the device, its capability and the layer
    shapes. Non-finite gradients skip the step (reported like a loss-scaler skip).

    Args:
        recipe: torchao float8 recipe: ``"tensorwise"``, ``"rowwise"``, ``"rowwise_with_gw_hp"``.
        filter_fn: ``fn(module, fqn) -> bool``: extra condition for converting a Linear.
        hold_schedulers: don't step ``interval="step"`` LR schedulers after skipped steps.

    Raises:
        ValueError: bad argument.
        RuntimeError: at setup, on a device without fp8 support or with no eligible layer.

    Example::

        trainer = Trainer(accelerator="cuda", devices=1, plugins=[Float8Training()], max_steps=10)
    """

    def __init__(
        self,
        recipe: str = "tensorwise",
        filter_fn: Callable[[nn.Module, str], bool] | None = None,
        hold_schedulers: bool = True,
    ) -> None:
        super().__init__("bf16-mixed", "cuda")
        self.recipe = checks.one_of("recipe", recipe, RECIPES)
        if filter_fn is not None and not callable(filter_fn):
            raise ValueError(f"`filter_fn` must be callable or None, got {filter_fn!r}")
        self.filter_fn = filter_fn
        self.converted: list[str] = []
        self._init_bookkeeping(hold_schedulers)

    def connect(self, model: Any, optimizers: list, lr_scheduler_configs: list) -> Any:
        module = lightning_module(model)
        param = next(iter(module.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        ok, refused = eligible_linears(module)
        reason = fp8_support(device)
        if reason is None and not ok:
            reason = "no nn.Linear layer has both dimensions divisible by 16"
        if reason is not None:
            raise RuntimeError(
                f"Float8Training cannot run: {reason}. Eligible Linear layers: {', '.join(ok) or 'none'}; "
                f"ineligible (dimensions not divisible by 16): {', '.join(refused) or 'none'}"
            )
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        names = set(ok)

        def wanted(m: nn.Module, fqn: str) -> bool:
            return fqn in names and (self.filter_fn is None or self.filter_fn(m, fqn))

        convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name(self.recipe), module_filter_fn=wanted)
        self.converted = sorted(n for n in names if wanted(module.get_submodule(n), n))
        for opt in optimizers:
            check_scaler_optimizer(opt, type(self).__name__)
        self._guard_schedulers(optimizers, lr_scheduler_configs)
        return super().connect(model, optimizers, lr_scheduler_configs)

    def state_dict(self) -> dict[str, Any]:
        return self._bookkeeping_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_bookkeeping_state(state_dict)
