"""pl_optim: training tricks as pure-torch functions (this package) and Lightning callbacks
(:mod:`pl_optim.callbacks`). Nothing in this package imports lightning."""

from pl_optim.steps import StepHooks

__version__ = "0.1.0"

__all__ = [
    "StepHooks",
    "__version__",
]
