"""The bit-packed file of a self-compressed network (format ``PLOQ1``, little endian)::

    b"PLOQ1" | uint32 header length | JSON header | payload

For each quantised layer the payload holds: per output channel its storage width ``k_i`` (uint8)
and exponent ``e_i`` (float32); a bit mask of live input channels per group; then, for every
alive channel, the integers ``n = round(clamp(2^-e w, ...))`` of its live input columns stored as
unsigned ``k_i``-bit numbers ``n + 2^(k_i - 1)``, where ``k_i`` is the smallest two's-complement
width holding the channel's integers (at most ``ceil(b_i)``; 0 for a channel whose integers are
all 0, which stores nothing). All other tensors of the ``state_dict`` (biases, BatchNorm,
layers left in float) are stored raw. :func:`load_packed` rebuilds the weights as
``2^e * n`` — bit for bit the exported module's weights. Dead channels are zero rows until
channel removal deletes them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pl_optim.compression.export import export_compressed
from pl_optim.compression.quantizer import integer_codes, quantized_layers
from pl_optim.compression.size import groups_of, live_input_columns
from pl_optim.compression.surgery import match_shapes

MAGIC = b"PLOQ1"


@dataclass
class PackedSize:
    """Sizes of a packed file in bytes: ``total`` (the file), ``weights`` (quantised weights:
    integers, widths, exponents, masks), ``other`` (raw tensors) and ``header``."""

    total: int
    weights: int
    other: int
    header: int


def _bits_of(values: torch.Tensor, width: int) -> torch.Tensor:
    return ((values.reshape(-1, 1) >> torch.arange(width)) & 1).reshape(-1)


def _pack(bits: torch.Tensor) -> bytes:
    bits = torch.cat([bits.to(torch.int64), bits.new_zeros((-bits.numel()) % 8, dtype=torch.int64)])
    return bytes((bits.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8).tolist())


def _unpack(data: bytes, count: int) -> torch.Tensor:
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    byte = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    return ((byte.reshape(-1, 1) >> torch.arange(8)) & 1).reshape(-1)[:count]


def _width(codes: torch.Tensor) -> int:
    lo, hi, k = int(codes.min()), int(codes.max()), 0
    if lo == hi == 0:
        return 0
    k = 1
    while -(2 ** (k - 1)) > lo or hi > 2 ** (k - 1) - 1:
        k += 1
    return k


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    dt = getattr(torch, dtype)
    if not data:
        return torch.zeros(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(shape).clone()


def save_packed(module: nn.Module, path: str | Path) -> PackedSize:
    """Write the bit-packed file of a network carrying quantisers (format in the module docstring).

    Args:
        module: the quantised network (as trained).
        path: file to write.

    Returns:
        The sizes in bytes; ``total`` is the file size.

    Raises:
        ValueError: ``module`` has no quantised layer.
    """
    layers = quantized_layers(module)
    if not layers:
        raise ValueError(f"`module` ({type(module).__name__}) has no quantised layer to pack")
    payload = bytearray()
    header: dict = {"layers": [], "tensors": []}

    def put(data: bytes) -> list[int]:
        start = len(payload)
        payload.extend(data)
        return [start, len(data)]

    with torch.no_grad():
        for name, (layer, q) in layers.items():
            w = layer.parametrizations.weight.original
            g, c_out, c_in = groups_of(layer), w.shape[0], w.shape[1]
            codes = integer_codes(w, q.bits, q.exponent).reshape(c_out, c_in, -1)
            area = codes.shape[2]
            live = (layer.weight != 0).reshape(g, c_out // g, c_in, -1).any(dim=3).any(dim=1)  # [G, I_g]
            assert int(live.sum(1).repeat_interleave(c_out // g).sum()) == int(live_input_columns(layer, q).sum())
            widths, stream = [], []
            for i in range(c_out):
                row = codes[i][live[i // (c_out // g)]].reshape(-1)
                k = _width(row) if row.numel() else 0
                widths.append(k)
                if k:
                    stream.append(_bits_of(row + 2 ** (k - 1), k))
            bits = torch.cat(stream) if stream else torch.zeros(0, dtype=torch.int64)
            header["layers"].append(
                {
                    "name": f"{name}.weight" if name else "weight",
                    "shape": list(w.shape),
                    "groups": g,
                    "area": area,
                    "dtype": str(w.dtype).removeprefix("torch."),
                    "widths": put(bytes(widths)),
                    "exponent": put(_raw(q.exponent.float())),
                    "mask": put(_pack(live.reshape(-1))),
                    "codes": put(_pack(bits)),
                    "n_bits": int(bits.numel()),
                }
            )
        weights_bytes = len(payload)
        quantised = {entry["name"] for entry in header["layers"]}
        for key, t in export_compressed(module).state_dict().items():
            if key not in quantised:
                header["tensors"].append(
                    {"name": key, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": put(_raw(t))}
                )
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = MAGIC + struct.pack("<I", len(head)) + head + bytes(payload)
    Path(path).write_bytes(blob)
    return PackedSize(
        total=len(blob), weights=weights_bytes, other=len(payload) - weights_bytes, header=len(MAGIC) + 4 + len(head)
    )


def read_packed(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` (plain keys, as :func:`export_compressed` has them) stored in a packed file.

    Raises:
        ValueError: the file is not a ``PLOQ1`` file.
    """
    blob = Path(path).read_bytes()
    if not blob.startswith(MAGIC):
        raise ValueError(f"{str(path)!r} is not a pl_optim packed file (expected magic {MAGIC!r})")
    (n,) = struct.unpack("<I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(blob[start : start + n])
    payload = memoryview(blob)[start + n :]

    def get(ref: list[int]) -> bytes:
        return bytes(payload[ref[0] : ref[0] + ref[1]])

    state = {}
    for entry in header["layers"]:
        c_out, c_in = entry["shape"][:2]
        g, area = entry["groups"], entry["area"]
        widths = list(get(entry["widths"]))
        exponent = _from_raw(get(entry["exponent"]), "float32", [c_out])
        live = _unpack(get(entry["mask"]), g * c_in).bool().reshape(g, c_in)
        bits = _unpack(get(entry["codes"]), entry["n_bits"])
        codes = torch.zeros(c_out, c_in, area, dtype=torch.int64)
        pos = 0
        for i, k in enumerate(widths):
            if not k:
                continue
            cols = live[i // (c_out // g)]
            count = int(cols.sum()) * area
            values = (bits[pos : pos + count * k].reshape(count, k) << torch.arange(k)).sum(1) - 2 ** (k - 1)
            codes[i, cols] = values.reshape(-1, area)
            pos += count * k
        shape = (-1,) + (1,) * (len(entry["shape"]) - 1)
        weight = torch.exp2(exponent.reshape(shape)) * codes.reshape(entry["shape"]).to(torch.float32)
        state[entry["name"]] = weight.to(getattr(torch, entry["dtype"]))
    for entry in header["tensors"]:
        state[entry["name"]] = _from_raw(get(entry["data"]), entry["dtype"], entry["shape"])
    return state


def load_packed(path: str | Path, module: nn.Module) -> nn.Module:
    """Load a packed file into ``module`` (a plain network of the exported architecture, e.g. a
    fresh instance of the same class) and return it. When channels were removed during training,
    the layers of a full-size ``module`` are first shrunk to the stored shapes
    (:func:`~pl_optim.compression.surgery.match_shapes`).

    Raises:
        ValueError: ``module`` carries quantisers (load into a plain module), or a bad file.
    """
    if quantized_layers(module):
        raise ValueError("`module` carries quantisers; load a packed file into a plain module of the same architecture")
    state = read_packed(path)
    match_shapes(module, state)
    module.load_state_dict(state)
    return module
