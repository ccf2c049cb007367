"""Self-compressing networks: quantiser, size loss, dependency analysis, channel surgery, export."""

from pl_optim.compression.export import (
    PackedSize,
    export_compressed,
    load_packed,
    read_packed,
    recalibrate_batchnorm,
    save_packed,
)
from pl_optim.compression.inference import simplify_for_inference
from pl_optim.compression.quantizer import (
    ChannelQuantizer,
    attach_quantizers,
    dead_channels,
    quantize,
    quantized_layers,
    quantizer_parameters,
)
from pl_optim.compression.report import LayerSize, compression_stats, format_report, layer_sizes
from pl_optim.compression.size import add_size_grad, float_weight_count, size_bits, size_loss

__all__ = [
    "ChannelQuantizer",
    "LayerSize",
    "PackedSize",
    "add_size_grad",
    "attach_quantizers",
    "compression_stats",
    "dead_channels",
    "export_compressed",
    "float_weight_count",
    "format_report",
    "layer_sizes",
    "load_packed",
    "quantize",
    "quantized_layers",
    "quantizer_parameters",
    "read_packed",
    "recalibrate_batchnorm",
    "save_packed",
    "simplify_for_inference",
    "size_bits",
    "size_loss",
]
