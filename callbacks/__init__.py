"""Lightning callbacks of pl_optim (installed as ``pl_optim.callbacks``).

This is the only layer that imports lightning: thin classes deciding *when* to call the
pure-torch functions of :mod:`pl_optim`.
"""

from pl_optim.callbacks._base import StepHookCallback
from pl_optim.callbacks._channel_removal import load_compressed
from pl_optim.callbacks.amsgrad_toggle import AMSGradToggle
from pl_optim.callbacks.data_preview import DataPreview
from pl_optim.callbacks.decoupled_weight_decay import DecoupledWeightDecay
from pl_optim.callbacks.lottery_driver import TicketResult, TicketRun, find_ticket
from pl_optim.callbacks.lottery_ticket import LotteryTicket
from pl_optim.callbacks.lr_range_test import LRRangeTest
from pl_optim.callbacks.one_cycle import OneCycle
from pl_optim.callbacks.param_scheduler import ParamScheduler
from pl_optim.callbacks.precision import (
    PRECISIONS,
    Float8Training,
    LossScaledMixedPrecision,
    PureBF16,
    precision_plugin,
)
from pl_optim.callbacks.prediction_dynamics import PredictionDynamics
from pl_optim.callbacks.recipe_checks import RecipeChecks
from pl_optim.callbacks.self_compression import SelfCompression

__all__ = [
    "AMSGradToggle",
    "DataPreview",
    "DecoupledWeightDecay",
    "Float8Training",
    "LRRangeTest",
    "LossScaledMixedPrecision",
    "LotteryTicket",
    "TicketResult",
    "TicketRun",
    "find_ticket",
    "OneCycle",
    "PRECISIONS",
    "ParamScheduler",
    "PureBF16",
    "PredictionDynamics",
    "RecipeChecks",
    "SelfCompression",
    "StepHookCallback",
    "load_compressed",
    "precision_plugin",
]
