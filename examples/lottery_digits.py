"""Lottery tickets on the digits ConvNet: iterative magnitude pruning with late rewinding.

Trains the dense :class:`~examples.models.DigitsConvNet` (round 0, which also writes the rewind
checkpoint at step ``--rewind-to``), then ``--rounds`` times: prune ``--prune-fraction`` of the
remaining weights globally, rewind the survivors (weights, Adam moments, loops, callback states)
and retrain; with both controls every round (same masks re-initialised at random, random masks
of the same per-layer sparsity). Prints the per-round table, the ticket's sparse/dense bytes, and
saves the paper's figure (accuracy vs. % of weights remaining) as a PNG.

Usage::

    python -m examples.lottery_digits                          # 5 rounds of 30%, ~3 min on one core
    python -m examples.lottery_digits --rounds 8 --prune-fraction 0.2 --wandb   # W&B offline, one group
    python -m examples.lottery_digits --structured             # remove whole channels instead

Interrupt it at any time and run the same command again: finished runs are kept, the
interrupted one is redone, the result is the same as an uninterrupted search.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from examples.data import DigitsDataModule
from examples.models import DigitsConvNet
from pl_optim.callbacks import TicketResult, TicketRun, find_ticket
from pl_optim.lottery import encoding_bytes, export_ticket

#: kind -> matplotlib format of the figure (ticket and the two controls of the paper).
STYLES = {"ticket": "o-", "reinit": "s--", "random_masks": "^:"}


def plot_tickets(series: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]], path: str | Path) -> Path:
    """Save accuracy vs. % of weights remaining: ``series[panel][kind] = [(% weights, acc %, err), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
    for ax, (panel, kinds) in zip(axes[0], series.items()):
        for kind, pts in kinds.items():
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, fmt=STYLES.get(kind, "x-"), label=kind, capsize=2)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("% of weights remaining")
        ax.set_ylabel("val accuracy (%)")
        ax.set_title(panel)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_trainer(epochs: int, wandb_group: str | None = None, save_dir: str = "outputs"):
    """``trainer_fn`` for :func:`find_ticket`: quiet Trainers, optionally one offline W&B run per fit."""

    def make(run: TicketRun) -> Trainer:
        logger = False
        if wandb_group is not None:
            from lightning.pytorch.loggers import WandbLogger

            logger = WandbLogger(project="pl_optim-lottery", group=wandb_group, name=run.name, save_dir=save_dir,
                                 offline=True)
        return Trainer(max_epochs=epochs, logger=logger, enable_progress_bar=False, enable_checkpointing=False,
                       enable_model_summary=False, num_sanity_val_steps=0)

    return make


def run(args: argparse.Namespace) -> TicketResult:
    torch.set_num_threads(1)
    dm = DigitsDataModule()
    out = Path(args.out)

    def model_fn() -> DigitsConvNet:
        return DigitsConvNet(lr=args.lr)

    res = find_ticket(
        model_fn, make_trainer(args.epochs, args.wandb_group if args.wandb else None, str(out)), dm,
        rounds=args.rounds, prune_fraction=args.prune_fraction,
        rewind_to=args.rewind_to if args.rewind_to == "init" else int(args.rewind_to),
        structured=args.structured, scope="layerwise" if args.structured else "global",
        controls=("reinit",) if args.structured else ("reinit", "random_masks"),
        directory=out / ("search-structured" if args.structured else "search"), seed=args.seed,
    )
    print(res.table("val_acc"))
    ticket = export_ticket(res.ticket(model_fn), res.masks)
    size = encoding_bytes(ticket, res.masks)
    print(f"final ticket: {size.nonzero}/{size.total} parameters non-zero; bytes dense {size.dense}, "
          f"CSR {size.csr}, bitmap {size.bitmap}")
    series = {kind: [(100 * x, 100 * y, 0.0) for x, y in res.metric(kind, "val_acc")]
              for kind in STYLES if any(r["kind"] == kind for r in res.runs)}
    png = plot_tickets({"DigitsConvNet" + (" (structured)" if args.structured else ""): series},
                       out / ("lottery_digits_structured.png" if args.structured else "lottery_digits.png"))
    print(f"saved {png}")
    return res


def main(argv: list[str] | None = None) -> TicketResult:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prune-fraction", type=float, default=0.3)
    p.add_argument("--rewind-to", default="10", help="'init' or an optimizer step of round 0")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structured", action="store_true", help="prune and remove whole channels")
    p.add_argument("--wandb", action="store_true", help="log every fit to W&B (offline), one group")
    p.add_argument("--wandb-group", default="lottery-digits")
    p.add_argument("--out", default="outputs/lottery_digits")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
