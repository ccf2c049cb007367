"""Figures of the recipe: the batch just before the net, and the predictions on a fixed batch
over training. matplotlib is imported lazily; every function returns ``None`` without it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def is_image_batch(x: torch.Tensor) -> bool:
    """``(N, H, W)`` or ``(N, C, H, W)`` with 1, 3 or 4 channels."""
    return x.ndim == 3 or (x.ndim == 4 and x.shape[1] in (1, 3, 4))


def _as_images(x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    out = []
    for img in x:
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)  # per-image range, as the net sees contrast
        out.append(img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0))
    return out


def save_batch_preview(x: torch.Tensor, path: str | Path, titles: Sequence[str] | None = None,
                       colors: Sequence[str] | None = None, suptitle: str = "") -> Path | None:
    """Save a PNG of a batch: an image grid for image batches, else a heat map of the
    ``(samples, features)`` matrix. ``titles``/``colors`` label each image."""
    plt = _pyplot()
    if plt is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_image_batch(x):
        images = _as_images(x)
        cols = min(8, len(images))
        rows = math.ceil(len(images) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.55 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < len(images):
                ax.imshow(images[k].numpy(), cmap="gray")
                if titles is not None:
                    ax.set_title(titles[k], fontsize=7, color=(colors[k] if colors else "black"))
    else:
        flat = x.detach().float().cpu().reshape(x.shape[0], -1)
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(flat.numpy(), aspect="auto", cmap="coolwarm")
        fig.colorbar(im, ax=ax)
        ax.set_xlabel("feature")
        ax.set_ylabel("sample")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_prediction_dynamics(history: Sequence[Sequence[float]], epochs: Sequence[int], path: str | Path,
                             ylabel: str = "p(true class)") -> Path | None:
    """Save a PNG of one line per sample: ``history[e][i]`` (e.g. the probability of sample
    ``i``'s true class after epoch ``epochs[e]``)."""
    plt = _pyplot()
    if plt is None or not history:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    per_sample = list(zip(*history))
    for values in per_sample:
        ax.plot(list(epochs), list(values), marker="o", markersize=2, linewidth=1, alpha=0.7)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"predictions on a fixed batch of {len(per_sample)} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
