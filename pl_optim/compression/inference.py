"""Exact inference-time simplification of a plain network: fewer ops, same function.

:func:`simplify_for_inference` traces a network with ``torch.fx`` (in eval mode) and

1. **folds input-independent branches into constants.** A conv/linear whose weight is all zeros
   outputs its bias at every position (zero padding contributes ``0 * 0``), whatever the input;
   channel-wise ops in eval mode (BatchNorm, element-wise activations, max/adaptive pools, dropout)
   keep such a tensor input-independent and constant per channel. Where such a tensor is added to
   (or subtracted from, or multiplied with) a tensor that does depend on the input, it is replaced
   by a ``[1, C, 1, ...]`` buffer holding its per-channel value — or, when that value is 0 in
   every channel of an addition, the addition is dropped — and the ops that computed it are
   deleted. This is what a residual branch whose channels all died (part I: bit depth 0) becomes:
   one addition of a constant instead of two convolutions, two BatchNorms and two activations.
   Exact: the same numbers are added, so the outputs are bit-identical (for finite inputs; a
   zero-weight conv would turn an ``inf`` input into ``nan``, the constant does not).
2. **folds eval-mode BatchNorm into the conv/linear before it** when that layer's output feeds
   only the BatchNorm (``torch.fx.experimental.optimization.fuse``): one op fewer per pair; the
   outputs agree to float32 rounding (~1e-6 relative), not bit for bit.

Both are generic inference optimisations, not compression: to measure what compression buys,
apply the same function to the original network too (``examples/benchmarks/bench_channel_removal.py``
does).

Example::

    small = simplify_for_inference(export_compressed(model.net, x), x)
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from pl_optim.compression.ops import ADD_FUNCTIONS, CONV, MUL_FUNCTIONS, SUB_FUNCTIONS, op_kind
from pl_optim.compression.quantizer import quantized_layers

#: op kinds (:func:`~pl_optim.compression.ops.op_kind`) that keep an input-independent,
#: per-channel-constant tensor so in eval mode (dropout is the identity there)
_KEEPS_CONST = {"batchnorm", "elementwise", "const_pool", "dropout"}
_BROADCAST = ADD_FUNCTIONS | MUL_FUNCTIONS


def _is_constant_source(node: fx.Node, modules: dict) -> bool:
    """A conv/linear with an all-zero weight: its output is its bias (or 0) at every position."""
    if node.op != "call_module":
        return False
    mod = modules[node.target]
    return isinstance(mod, (*CONV, nn.Linear)) and not bool(mod.weight.count_nonzero())


def _keeps_constant(node: fx.Node, modules: dict) -> bool:
    return op_kind(node, modules) in _KEEPS_CONST


def _per_channel(value: torch.Tensor) -> torch.Tensor | None:
    """``value`` ([N, C, ...]) as a broadcastable ``[1, C, 1, ...]`` tensor, if it is the same at every
    batch index and position (None otherwise)."""
    if value.dim() < 2:
        return None
    c = value[(slice(0, 1), slice(None)) + (slice(0, 1),) * (value.dim() - 2)]
    return c.clone() if torch.equal(value, c.expand_as(value)) else None


def fold_constant_branches(gm: fx.GraphModule, *example_args) -> int:
    """Step 1 of :func:`simplify_for_inference`, in place on ``gm`` (eval mode); returns how many
    constant operands were folded."""
    modules = dict(gm.named_modules())
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if _is_constant_source(node, modules) or (inputs and all(a in const for a in inputs)
                                                  and _keeps_constant(node, modules)):
            const.add(node)
    uses = [(n, a) for n in gm.graph.nodes if n.op == "call_function" and n.target in _BROADCAST and n not in const
            for a in n.args if isinstance(a, fx.Node) and a in const]
    if not uses:
        return 0
    values: dict[fx.Node, torch.Tensor] = {}
    shapes: dict[fx.Node, torch.Size] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n in const:
                values[n] = out
            if isinstance(out, torch.Tensor):
                shapes[n] = out.shape
            return out

    with torch.no_grad():
        _Record(gm).run(*example_args)
    folded = 0
    for node, arg in uses:
        other = [a for a in node.args if a is not arg]
        c = _per_channel(values[arg])
        if c is None or len(other) != 1 or not isinstance(other[0], fx.Node) or other[0] in const \
                or shapes.get(other[0]) != shapes.get(node):
            continue  # the folded constant must not change the result's shape (broadcasting)
        if node.target in ADD_FUNCTIONS and not bool(c.count_nonzero()) and (node.target not in SUB_FUNCTIONS or node.args[0] is other[0]):
            node.replace_all_uses_with(other[0])  # x + 0, 0 + x, x - 0
        else:
            name = f"_folded_constant_{folded}"
            gm.register_buffer(name, c)
            with gm.graph.inserting_before(node):
                node.replace_input_with(arg, gm.graph.get_attr(name))
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def simplify_for_inference(module: nn.Module, *example_args, fold_batchnorm: bool = True) -> fx.GraphModule:
    """An eval-mode ``torch.fx.GraphModule`` computing ``module`` with fewer ops (see the module
    docstring); ``module`` itself is unchanged.

    Args:
        module: a plain network (e.g. the output of :func:`~pl_optim.compression.export_compressed`,
            or any float network, to compare like with like).
        *example_args: one example input of ``module.forward`` (its values are used only to read
            the constants; any batch size).
        fold_batchnorm: also fold eval-mode BatchNorm into the preceding conv/linear (outputs then
            agree to float rounding instead of bit for bit).

    Raises:
        ValueError: ``module`` cannot be traced with ``torch.fx`` or still carries quantisers, no
            example input was given, or ``fold_batchnorm`` is not a bool.
    """
    if not isinstance(fold_batchnorm, bool):
        raise ValueError(f"`fold_batchnorm` must be a bool, got {fold_batchnorm!r}")
    if not example_args:
        raise ValueError("`example_args`: pass one example input of the module's forward")
    if quantized_layers(module):
        raise ValueError("`module` carries quantisers; simplify the plain network export_compressed(module, "
                         "example_input) returns")
    module = copy.deepcopy(module).eval()
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; report them uniformly
        raise ValueError(f"simplify_for_inference needs a torch.fx-traceable module: {type(exc).__name__}: {exc}") from exc
    gm.eval()
    fold_constant_branches(gm, *example_args)
    if fold_batchnorm:
        gm = fuse(gm, inplace=True, no_trace=True).eval()
    return gm
