"""Karpathy's training recipe as checks on a model, a batch and a loss (pure torch).

See :mod:`pl_optim.recipe.core` for the checks, :mod:`pl_optim.recipe.plots` for the data
preview and prediction-dynamics figures, and :class:`pl_optim.callbacks.RecipeChecks` for the
Lightning callback running them on the first training batch.
"""

from pl_optim.recipe._setup import LOSSES, TASKS, Loss, resolve_loss, split_batch
from pl_optim.recipe.core import (
    CHECKS,
    check_activations,
    check_batch_independence,
    check_final_bias,
    check_gradient_flow,
    check_init_loss,
    check_input_baseline,
    check_overfit_batch,
    prepare,
    run_recipe,
)
from pl_optim.recipe.report import CheckResult, RecipeReport

__all__ = [
    "CHECKS",
    "LOSSES",
    "TASKS",
    "CheckResult",
    "Loss",
    "RecipeReport",
    "check_activations",
    "check_batch_independence",
    "check_final_bias",
    "check_gradient_flow",
    "check_init_loss",
    "check_input_baseline",
    "check_overfit_batch",
    "prepare",
    "resolve_loss",
    "run_recipe",
    "split_batch",
]
