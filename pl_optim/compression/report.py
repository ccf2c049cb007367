"""Compression report: per-layer table, network totals, plots (plain numbers, no lightning).

"% of float bits kept" is ``Q / (32 N)`` and "% of weights kept" is the number of weights in
alive output channels and live input channels over ``N`` (formulas in :mod:`.size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pl_optim.compression.quantizer import dead_channels, quantized_layers
from pl_optim.compression.size import FLOAT_BITS, groups_of, kernel_area, layer_size_bits, live_input_columns
from pl_optim.report import Table


@dataclass
class LayerSize:
    """One row of the compression report (plain numbers)."""

    name: str
    out_alive: int
    out_total: int
    in_alive: int
    in_total: int
    mean_bits: float
    size_bits: float
    float_bits: int
    weights_kept: int

    def as_dict(self) -> dict:
        return asdict(self)


def layer_sizes(model: nn.Module) -> list[LayerSize]:
    """Per-layer report rows: alive/total output and input channels, mean bit depth (over all
    output channels, dead ones counting 0), size in bits, float size, weights kept."""
    rows = []
    with torch.no_grad():
        for name, (layer, q) in quantized_layers(model).items():
            cols = live_input_columns(layer, q)
            alive = ~dead_channels(q)
            area = kernel_area(layer)
            g = groups_of(layer)
            c_out = q.bits.numel()
            in_total = layer.parametrizations.weight.original.shape[1] * g
            in_alive = int(cols.reshape(g, c_out // g)[:, 0].sum()) if c_out else 0
            rows.append(
                LayerSize(
                    name=name,
                    out_alive=int(alive.sum()),
                    out_total=c_out,
                    in_alive=in_alive,
                    in_total=int(in_total),
                    mean_bits=float(torch.relu(q.bits).mean()) if c_out else 0.0,
                    size_bits=float(layer_size_bits(layer, q)),
                    float_bits=FLOAT_BITS * int(q.float_numel),
                    weights_kept=int((alive * cols).sum()) * area,
                )
            )
    return rows


def compression_stats(model: nn.Module) -> dict[str, float]:
    """Network totals: ``Q`` (bits), ``N``, ``bits_pct`` (% of float bits kept), ``weights_pct``
    (% of weights kept) and ``mean_bits/<layer>`` for each quantised layer."""
    rows = layer_sizes(model)
    n = sum(r.float_bits for r in rows) // FLOAT_BITS
    q = sum(r.size_bits for r in rows)
    stats = {
        "Q": q,
        "N": float(n),
        "bits_pct": 100.0 * q / (FLOAT_BITS * n),
        "weights_pct": 100.0 * sum(r.weights_kept for r in rows) / n,
    }
    stats.update({f"mean_bits/{r.name}": r.mean_bits for r in rows})
    return stats


def size_table(rows: list[LayerSize], title: str = "") -> Table:
    """The per-layer rows as a :class:`~pl_optim.report.Table` (with ``pct_float``, each layer's
    size as % of its float bits) and a ``total`` footer; ``str()`` of it is the printed report."""
    data = [{**r.as_dict(), "pct_float": 100.0 * r.size_bits / r.float_bits} for r in rows]
    q, fb = sum(r.size_bits for r in rows), sum(r.float_bits for r in rows)
    footer = {"name": "total", "size_bits": q, "float_bits": fb, "pct_float": 100.0 * q / fb if fb else 0.0,
              "weights_kept": sum(r.weights_kept for r in rows)} if rows else None
    formats = {"mean_bits": ".2f", "size_bits": ".0f", "pct_float": ".2f"}
    return Table(data, formats=formats, title=title, footer=footer)


def format_report(rows: list[LayerSize]) -> str:
    """The per-layer table as fixed-width text (one header line, one line per layer, a total)."""
    return str(size_table(rows))


def plot_series(
    path: str | Path, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str = ""
) -> Path | None:
    """Save a line plot of ``series`` against ``x`` as a PNG; ``None`` when matplotlib is missing.

    Example::

        plot_series("size.png", epochs, {"% float bits": bits_pct}, "epoch", "% of float bits kept")
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
