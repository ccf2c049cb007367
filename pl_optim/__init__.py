"""pl_optim: training tricks as pure-torch functions (this package) and Lightning callbacks
(:mod:`pl_optim.callbacks`). Nothing in this package imports lightning."""

from pl_optim.amsgrad import set_amsgrad
from pl_optim.lottery import MaskSet, RewindPoint, export_ticket, magnitude_masks
from pl_optim.lr_range_test import lr_range_test
from pl_optim.schedules import one_cycle
from pl_optim.steps import StepHooks, StepLedger
from pl_optim.weight_decay import DecoupledDecay, apply_weight_decay

__version__ = "0.1.0"

__all__ = [
    "DecoupledDecay",
    "apply_weight_decay",
    "set_amsgrad",
    "StepHooks",
    "StepLedger",
    "one_cycle",
    "lr_range_test",
    "MaskSet",
    "RewindPoint",
    "export_ticket",
    "magnitude_masks",
    "__version__",
]
