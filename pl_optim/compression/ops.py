"""The operator tables of the compression passes: what each traced op does to a channel.

One home for the tables that :mod:`.graph` (channel dependency analysis) and :mod:`.inference`
(constant folding) share. :func:`op_kind` names the role of one ``torch.fx`` node; each pass keeps
a dispatch table from these names to its own handler.

Kinds (``op_kind``):

* ``"conv"``, ``"linear"``, ``"batchnorm"``: the layers the surgery slices;
* ``"elementwise"``: the same function applied to every element (activations, ``x.clone()``):
  maps a per-channel constant to a per-channel constant;
* ``"const_pool"``: max / adaptive pools, which keep a per-channel constant as it is;
* ``"zero_pool"``: average pools with zero padding, which keep only a constant 0 constant;
* ``"dropout"``: dropout and per-sample drops (``torchvision.ops.stochastic_depth``): identity in
  eval mode, keep only 0 in train mode;
* ``"add"`` (``+``, ``-``), ``"mul"``, ``"div"``, ``"cat"``, ``"reduce"`` (``mean``/``sum``/``amax``),
  ``"flatten"`` (``flatten``/``view``/``reshape``), ``"permute"``, ``"shape"`` (size queries),
  ``"layernorm"`` (normalises ACROSS channels, never channel-wise);
* ``None``: anything else (the passes treat it as unknown).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
)
CONST_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
ZERO_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
LAYERNORM_MODULES = (nn.LayerNorm, nn.GroupNorm)

ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu, F.mish, torch.tanh,
    F.tanh, torch.sigmoid, F.sigmoid, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "sigmoid_", "contiguous", "clone"}
CONST_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
}
ZERO_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
#: functions of other packages, by qualified name (never imported here)
DROPOUT_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth"}
LAYERNORM_FUNCTIONS = {F.layer_norm, F.group_norm}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
SUB_FUNCTIONS = {operator.sub, operator.isub, torch.sub}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
CAT_FUNCTIONS = {torch.cat, torch.concat}
REDUCE_FUNCTIONS = {torch.mean, torch.amax, torch.sum}
FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
PERMUTE_FUNCTIONS = {torch.permute}

_METHODS = {
    "add": "add", "add_": "add", "sub": "add", "sub_": "add", "mul": "mul", "mul_": "mul", "div": "div",
    "div_": "div", "mean": "reduce", "amax": "reduce", "sum": "reduce", "flatten": "flatten", "view": "flatten",
    "reshape": "flatten", "permute": "permute", "size": "shape", "dim": "shape",
    **dict.fromkeys(ELEMENTWISE_METHODS, "elementwise"),
}
_FUNCTIONS = [
    (ELEMENTWISE_FUNCTIONS, "elementwise"), (CONST_POOL_FUNCTIONS, "const_pool"), (ZERO_POOL_FUNCTIONS, "zero_pool"),
    (DROPOUT_FUNCTIONS, "dropout"), (LAYERNORM_FUNCTIONS, "layernorm"), (ADD_FUNCTIONS, "add"),
    (MUL_FUNCTIONS, "mul"), (DIV_FUNCTIONS, "div"), (CAT_FUNCTIONS, "cat"), (REDUCE_FUNCTIONS, "reduce"),
    (FLATTEN_FUNCTIONS, "flatten"), (PERMUTE_FUNCTIONS, "permute"), ({getattr}, "shape"),
]
_MODULES = [
    (CONV, "conv"), ((nn.Linear,), "linear"), (BATCHNORM, "batchnorm"), (ELEMENTWISE_MODULES, "elementwise"),
    (CONST_POOL_MODULES, "const_pool"), (ZERO_POOL_MODULES, "zero_pool"), (DROPOUT_MODULES, "dropout"),
    ((nn.Flatten,), "flatten"), (LAYERNORM_MODULES, "layernorm"),
]


def qualified_name(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', fn))}"


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The role of one traced node (see the module docstring), or None when unknown."""
    if node.op == "call_module":
        mod = modules[node.target]
        return next((kind for types, kind in _MODULES if isinstance(mod, types)), None)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_function":
        for table, kind in _FUNCTIONS:
            try:
                if node.target in table:
                    return kind
            except TypeError:  # an unhashable target
                return None
        if qualified_name(node.target) in DROPOUT_BY_NAME:
            return "dropout"
    return None


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``"BatchNorm2d (features.1)"`` / ``"add (add_3)"``: the type or function and where."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    return f"{getattr(node.target, '__name__', node.target)} ({node.name})"
