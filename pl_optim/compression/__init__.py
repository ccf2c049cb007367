"""Self-compressing networks, the whole method in pure torch (no lightning).

For a raw PyTorch loop (``docs/self_compression.md``, ``docs/channel_removal.md``)::

    attach_quantizers(net)                                            # b, e per output channel
    opt = torch.optim.AdamW([{"params": weight_parameters(net)}, *quantizer_param_groups(net, 0.05, 0.01)])
    removal = ChannelRemoval(net, example_input=x0)
    for x, y in loader:
        loss = F.cross_entropy(net(x), y); opt.zero_grad(); loss.backward()
        add_size_grad(net, gamma)                                     # d(gamma Q / N)/db into bits.grad
        # (+ compute_gamma, positions, removal.graph: the compute-weighted term and the column cost)
        opt.step()
        removal.step([opt])                                           # dead channels out, optimizer state too

Modules: :mod:`.quantizer` (quantiser, param groups, repairs), :mod:`.size` (size terms, output
positions), :mod:`.graph` / :mod:`.surgery` (dependency analysis, slicing), :mod:`.removal` (the
decision + removal), :mod:`.checkpoint` (plain full-size state dicts and back), :mod:`.export`,
:mod:`.packed` (bit-packed file), :mod:`.batchnorm` (recalibration), :mod:`.report`, :mod:`.inference`.
"""

from pl_optim.compression.batchnorm import recalibrate_batchnorm
from pl_optim.compression.checkpoint import (
    compressed_state,
    plain_state_dict,
    restore_compressed,
    shrink_to_state_dict,
    to_parametrized,
)
from pl_optim.compression.export import export_compressed
from pl_optim.compression.inference import simplify_for_inference
from pl_optim.compression.packed import PackedSize, load_packed, read_packed, save_packed
from pl_optim.compression.quantizer import (
    ChannelQuantizer,
    attach_quantizers,
    clean_gradients,
    dead_channels,
    move_to_own_groups,
    place_quantizers,
    quantize,
    quantized_layers,
    quantizer_param_groups,
    quantizer_parameters,
    repair_nonfinite,
    round_bits,
    snapshot,
    weight_parameters,
)
from pl_optim.compression.removal import ChannelRemoval, dead_producers
from pl_optim.compression.report import LayerSize, compression_stats, format_report, layer_sizes
from pl_optim.compression.size import (
    OutputPositions,
    add_size_grad,
    column_cost_loss,
    compute_size_loss,
    float_weight_count,
    output_positions,
    size_bits,
    size_loss,
)

__all__ = [
    "ChannelQuantizer",
    "ChannelRemoval",
    "LayerSize",
    "OutputPositions",
    "PackedSize",
    "add_size_grad",
    "attach_quantizers",
    "clean_gradients",
    "column_cost_loss",
    "compressed_state",
    "compression_stats",
    "compute_size_loss",
    "dead_channels",
    "dead_producers",
    "export_compressed",
    "float_weight_count",
    "format_report",
    "layer_sizes",
    "load_packed",
    "move_to_own_groups",
    "output_positions",
    "place_quantizers",
    "plain_state_dict",
    "quantize",
    "quantized_layers",
    "quantizer_param_groups",
    "quantizer_parameters",
    "read_packed",
    "recalibrate_batchnorm",
    "repair_nonfinite",
    "restore_compressed",
    "round_bits",
    "save_packed",
    "shrink_to_state_dict",
    "simplify_for_inference",
    "size_bits",
    "size_loss",
    "snapshot",
    "to_parametrized",
    "weight_parameters",
]
