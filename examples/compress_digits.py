"""Self-compressing the digits ConvNet: accuracy vs. size for several gamma (seed figure 1).

Trains :class:`examples.models.DigitsConvNet` once in float and once with
:class:`pl_optim.callbacks.SelfCompression` for each ``gamma``, then prints validation accuracy,
% of the float bits kept, % of the weights kept and the size of the bit-packed file, and saves a
PNG of accuracy vs. % bits::

    python -m examples.compress_digits --gammas 0.01 0.03 0.1 --epochs 30 --out compress_digits.png
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from examples.benchmarks._cli import (
    Progress,
    benchmark_parser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from examples.data import DigitsDataModule
from examples.models import DigitsConvNet
from pl_optim.callbacks import SelfCompression
from pl_optim.compression import (
    compression_stats,
    export_compressed,
    load_packed,
    quantizer_parameters,
    recalibrate_batchnorm,
    save_packed,
)
from pl_optim.compression.report import plot_series

#: The recipe shared by the float and the compressed runs (tuned here, see docs/self_compression.md).
DEFAULTS = dict(
    epochs=30, lr=3e-3, quant_lr=0.05, exponent_lr=0.01, label_smoothing=0.1, init_bits=8.0, batch_size=64,
    remove_channels=True, recalibrate_bn=True, freeze_at=None,
)


class CompressibleDigitsConvNet(DigitsConvNet):
    """DigitsConvNet with AdamW and a per-epoch cosine schedule over ``epochs`` for every param
    group; the quantiser parameters (present when SelfCompression attached them before
    ``configure_optimizers``) get a group of their own at ``quant_lr``, without weight decay.

    Args:
        epochs: length of the cosine schedule (the Trainer's ``max_epochs``).
        quant_lr: peak learning rate of ``bits``/``exponent``.
        **kwargs: :class:`DigitsConvNet` arguments (``lr``, ``weight_decay``, ...).
    """

    def __init__(
        self, epochs: int = 30, quant_lr: float = 0.05, exponent_lr: float | None = None, label_smoothing: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(optimizer="adamw", **kwargs)
        self.epochs, self.quant_lr, self.exponent_lr = epochs, quant_lr, exponent_lr
        self.label_smoothing = label_smoothing

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        quant = quantizer_parameters(self)
        ids = {id(p) for p in quant}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids]}]
        if quant:
            bits, exponents = quant[0::2], quant[1::2]
            e_lr = self.quant_lr if self.exponent_lr is None else self.exponent_lr
            groups.append({"params": bits, "lr": self.quant_lr, "weight_decay": 0.0})
            groups.append({"params": exponents, "lr": e_lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)]


def _accuracy(net: torch.nn.Module, dm: DigitsDataModule) -> float:
    net.eval()
    x, y = dm.val_set.tensors
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def train(
    gamma: float | None,
    seed: int = 0,
    epochs: int = DEFAULTS["epochs"],
    lr: float = DEFAULTS["lr"],
    quant_lr: float = DEFAULTS["quant_lr"],
    init_bits: float = DEFAULTS["init_bits"],
    batch_size: int = DEFAULTS["batch_size"],
    remove_channels: bool = DEFAULTS["remove_channels"],
    exponent_lr: float | None = DEFAULTS["exponent_lr"],
    label_smoothing: float = DEFAULTS["label_smoothing"],
    recalibrate_bn: bool = DEFAULTS["recalibrate_bn"],
    freeze_at: float | None = DEFAULTS["freeze_at"],
) -> dict:
    """Train DigitsConvNet (AdamW, cosine lr, label smoothing) in float (``gamma=None``) or with SelfCompression
    (dead channels removed during training when ``remove_channels``; bits/exponents held fixed from ``freeze_at``
    of the steps on), then (``recalibrate_bn``)
    re-estimate the BatchNorm statistics on the training set; return validation accuracy,
    % bits, % weights, the packed file's bytes and the accuracy of the model reloaded from it."""
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size)
    model = CompressibleDigitsConvNet(
        epochs=epochs, quant_lr=quant_lr, exponent_lr=exponent_lr, lr=lr, weight_decay=0.0,
        label_smoothing=label_smoothing,
    )
    callbacks = [] if gamma is None else [
        SelfCompression(gamma, init_bits=init_bits, plot_path=False, remove_channels=remove_channels, freeze_at=freeze_at)
    ]
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks, num_sanity_val_steps=0, check_val_every_n_epoch=epochs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    if recalibrate_bn:  # BatchNorm statistics of the final weights (both runs: same recipe)
        recalibrate_batchnorm(model.net, (x for x, _ in dm.train_dataloader()))
    result = {"gamma": gamma, "seed": seed, "acc": _accuracy(model.net, dm), "bits_pct": 100.0, "weights_pct": 100.0}
    if gamma is not None:
        stats = compression_stats(model.net)
        plain = export_compressed(model.net)
        with tempfile.TemporaryDirectory() as tmp:
            sizes = save_packed(model.net, Path(tmp) / "net.ploq")
            reloaded = load_packed(Path(tmp) / "net.ploq", DigitsConvNet().net)
        result.update(
            bits_pct=stats["bits_pct"], weights_pct=stats["weights_pct"], packed_bytes=sizes.total,
            packed_weight_bytes=sizes.weights, exported_acc=_accuracy(plain, dm), reloaded_acc=_accuracy(reloaded, dm),
        )
    result["float_bytes"] = 4 * sum(p.numel() for p in DigitsConvNet().net.parameters())
    return result


def add_recipe_arguments(
    parser: argparse.ArgumentParser, epochs: int = DEFAULTS["epochs"], freeze_at: float | None = DEFAULTS["freeze_at"]
) -> None:
    """Command-line options of the training recipe (shared with the benchmark)."""
    parser.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs of every run")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"], help="AdamW lr of the weights (cosine schedule)")
    parser.add_argument("--quant-lr", type=positive_float, default=DEFAULTS["quant_lr"], help="lr of the bit depths")
    parser.add_argument("--exponent-lr", type=positive_float, default=DEFAULTS["exponent_lr"], help="lr of the exponents")
    parser.add_argument("--label-smoothing", type=non_negative_float, default=DEFAULTS["label_smoothing"],
                        help="cross-entropy label smoothing")
    parser.add_argument("--init-bits", type=positive_float, default=DEFAULTS["init_bits"], help="initial bit depth of every channel")
    parser.add_argument("--keep-channels", action="store_true", help="do not remove dead channels during training")
    parser.add_argument("--no-recalibrate", action="store_true", help="keep the BatchNorm statistics of training")
    parser.add_argument("--freeze-at", type=non_negative_float, default=freeze_at,
                        help="fraction of the optimizer steps after which bits/exponents are held fixed (0: never)")


def recipe(args: argparse.Namespace) -> tuple[dict, dict]:
    """``train`` keyword arguments of the float run and of the compressed runs."""
    shared = dict(epochs=args.epochs, lr=args.lr, label_smoothing=args.label_smoothing, recalibrate_bn=not args.no_recalibrate)
    compressed = dict(shared, quant_lr=args.quant_lr, exponent_lr=args.exponent_lr, init_bits=args.init_bits,
                      remove_channels=not args.keep_channels, freeze_at=args.freeze_at or None)
    return shared, compressed


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--gammas", type=positive_float, nargs="+", default=[0.03, 0.1, 0.3, 1.0],
                        help="SelfCompression(gamma=...) of the compressed runs")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of every run")
    parser.add_argument("--out", default="outputs/compress_digits.png", help="PNG of accuracy vs. %% bits")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    float_kw, comp_kw = recipe(args)
    progress = Progress("compress_digits")
    progress(f"training the float model ({args.epochs} epochs)")
    rows = [train(None, seed=args.seed, **float_kw)]
    for g in args.gammas:
        progress(f"training with gamma {g:g}")
        rows.append(train(g, seed=args.seed, **comp_kw))
    print(f"{'gamma':>8} {'val acc':>8} {'% bits':>8} {'% weights':>10} {'packed B':>9} {'reloaded acc':>13}")
    for r in rows:
        g = "float" if r["gamma"] is None else f"{r['gamma']:g}"
        packed = r.get("packed_bytes", r["float_bytes"])
        print(f"{g:>8} {100 * r['acc']:>7.2f}% {r['bits_pct']:>7.2f}% {r['weights_pct']:>9.2f}% {packed:>9d} "
              f"{100 * r.get('reloaded_acc', r['acc']):>12.2f}%")
    compressed = rows[1:]
    path = plot_series(
        args.out, [r["bits_pct"] for r in compressed], {"SelfCompression": [100 * r["acc"] for r in compressed]},
        "% of float bits kept", "val accuracy (%)", f"DigitsConvNet (float: {100 * rows[0]['acc']:.2f}%)",
    )
    if path is not None:
        print(f"plot: {path}")
    return rows


if __name__ == "__main__":
    main()
