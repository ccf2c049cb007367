"""Lightning callbacks of pl_optim (installed as ``pl_optim.callbacks``).

This is the only layer that imports lightning: thin classes deciding *when* to call the
pure-torch functions of :mod:`pl_optim`.
"""

from pl_optim.callbacks._base import StepHookCallback
from pl_optim.callbacks.self_compression import SelfCompression

__all__ = [
    "SelfCompression",
    "StepHookCallback",
]
