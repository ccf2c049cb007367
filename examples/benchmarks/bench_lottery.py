"""Benchmark: lottery tickets (iterative magnitude pruning with rewinding) vs. both controls.

For each net (the digits ConvNet, a narrow ResNet-9 on the 8x8 digits) and each seed, one
:func:`pl_optim.callbacks.find_ticket` search (global pruning, ``--prune-fraction`` of the
remaining weights per round, rewinding to ``--rewind-to``, controls: random re-initialisation and
random masks of the same per-layer sparsity), then prints, over seeds (mean ± std):

* the per-round table: % of weights left, validation accuracy of ticket / reinit / random masks;
* the smallest % of weights at which the ticket (mean) stays within 0.5 pp of the dense net at
  every level down to it (goal: <= 20%);
* at the first level with <= 5% of the weights: ticket − random re-init (goal: >= 1 pp);
* structured variant (``--structured-rounds``): channels pruned by L1 norm and removed; % of
  parameters and CPU latency of the exported ticket / the dense net at batch 1 and 32 (wall
  clock, interleaved, median).

Figures are printed and saved to ``--out`` (JSON, PNG). CPU: ``torch.set_num_threads(1)``.

Usage::

    python -m examples.benchmarks.bench_lottery                       # both nets, 3 seeds
    python -m examples.benchmarks.bench_lottery --nets digits --seeds 0 --rounds 3 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from examples.benchmarks.bench_channel_removal import _inputs, latency
from examples.data import DigitsDataModule
from examples.lottery_digits import STYLES, plot_tickets
from examples.models import DigitsConvNet, ResNet9
from pl_optim.callbacks import find_ticket
from pl_optim.lottery import encoding_bytes, export_ticket, parameter_count

NETS = {
    "digits": lambda lr: DigitsConvNet(lr=lr),
    "resnet9": lambda lr: ResNet9(widths=(16, 32, 64, 128), in_channels=1, lr=lr),
}


def _trainer(epochs: int):
    def make(run):
        return Trainer(max_epochs=epochs, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                       enable_model_summary=False, num_sanity_val_steps=0)
    return make


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: list, metric: str = "val_acc") -> dict:
    """Per level over seeds: remaining, and mean/std of each kind's metric; plus the two targets."""
    levels = sorted({r["round"] for r in results[0].runs})
    rows = []
    for lv in levels:
        row = {"round": lv}
        for kind in ("ticket", "reinit", "random_masks"):
            vals = [r["metrics"][metric] for res in results for r in res.runs if r["round"] == lv and r["kind"] == kind]
            if vals:
                row[kind] = _mean_std(vals)
        row["remaining"] = statistics.mean(
            r["remaining"] for res in results for r in res.runs if r["round"] == lv and r["kind"] == "ticket")
        gaps = [_by(res, lv, "ticket") - _by(res, lv, "reinit") for res in results if _has(res, lv, "reinit")]
        if gaps:
            row["gap_reinit"] = _mean_std(gaps)
        rows.append(row)
    dense = rows[0]["ticket"][0]
    within = None
    for row in rows:
        if row["ticket"][0] >= dense - 0.005:
            within = row["remaining"]
        else:
            break
    at5 = next((row for row in rows if row["remaining"] <= 0.05 and "gap_reinit" in row), None)
    return {"rows": rows, "dense": dense, "smallest_within_0.5pp": within,
            "gap_at_5pct": (at5["remaining"], *at5["gap_reinit"]) if at5 else None}


def _by(res, lv: int, kind: str) -> float:
    return next(r["metrics"]["val_acc"] for r in res.runs if r["round"] == lv and r["kind"] == kind)


def _has(res, lv: int, kind: str) -> bool:
    return any(r["round"] == lv and r["kind"] == kind for r in res.runs)


def _cell(row: dict, key: str) -> str:
    return f"{100 * row[key][0]:7.2f} ± {100 * row[key][1]:5.2f}" if key in row else f"{'':>15}"


def print_summary(name: str, s: dict, seeds: int) -> None:
    print(f"\n== {name}: val_acc over {seeds} seed(s), mean ± std ==")
    print(f"{'round':>5} {'% weights':>9} {'ticket':>16} {'reinit':>16} {'random masks':>16} {'ticket-reinit pp':>17}")
    for row in s["rows"]:
        print(f"{row['round']:5d} {100 * row['remaining']:9.2f} {_cell(row, 'ticket'):>16} {_cell(row, 'reinit'):>16} "
              f"{_cell(row, 'random_masks'):>16} {_cell(row, 'gap_reinit'):>17}")
    w = s["smallest_within_0.5pp"]
    print(f"smallest % of weights with the ticket within 0.5 pp of dense ({100 * s['dense']:.2f}%): "
          f"{100 * w:.2f}% (goal <= 20%: {'MET' if w is not None and w <= 0.20 else 'NOT MET'})")
    g = s["gap_at_5pct"]
    if g is None:
        print("no level with <= 5% of the weights (more rounds needed): gap NOT MEASURED")
    else:
        print(f"at {100 * g[0]:.2f}% of the weights, ticket - random re-init = {100 * g[1]:.2f} ± {100 * g[2]:.2f} pp "
              f"(goal >= 1 pp: {'MET' if g[1] >= 0.01 else 'NOT MET'})")


def structured(name: str, args, dm: DigitsDataModule) -> dict:
    out = {"params": [], "lat1": [], "lat32": [], "acc": [], "dense_acc": []}
    for seed in args.seeds:
        res = find_ticket(lambda: NETS[name](args.lr), _trainer(args.epochs), dm, rounds=args.structured_rounds,
                          prune_fraction=args.structured_fraction, rewind_to=args.rewind_to, scope="layerwise",
                          structured=True, controls=(), directory=Path(args.out) / f"{name}-structured-s{seed}", seed=seed)
        ticket = export_ticket(res.ticket(lambda: NETS[name](args.lr)).net)
        dense = NETS[name](args.lr).net.eval()
        out["params"].append(parameter_count(ticket) / parameter_count(dense))
        out["acc"].append(res.runs[-1]["metrics"]["val_acc"])
        out["dense_acc"].append(res.runs[0]["metrics"]["val_acc"])
        for batch in (1, 32):
            t = latency({"ticket": ticket, "dense": dense}, _inputs(dm, batch), args.reps)
            out[f"lat{batch}"].append(statistics.median(t["ticket"]) / statistics.median(t["dense"]))
    print(f"per seed: params {out['params']}, batch 1 {out['lat1']}, batch 32 {out['lat32']}")
    print(f"\n== {name} structured ({args.structured_rounds} rounds of {args.structured_fraction:.0%} channels), "
          f"{len(args.seeds)} seed(s) ==")
    for key, label in (("params", "% params ticket/dense"), ("lat1", "latency ratio batch 1"),
                       ("lat32", "latency ratio batch 32")):
        m, s = _mean_std(out[key])
        print(f"{label:>24}: {100 * m if key == 'params' else m:.3f} ± {100 * s if key == 'params' else s:.3f}")
    print(f"{'val_acc dense -> ticket':>24}: {100 * statistics.mean(out['dense_acc']):.2f}% -> "
          f"{100 * statistics.mean(out['acc']):.2f}%")
    return out


def plot(summaries: dict, path: Path) -> Path:
    """The paper's figure, mean ± std over seeds, one panel per net."""
    return plot_tickets({name: {kind: [(100 * r["remaining"], 100 * r[kind][0], 100 * r[kind][1])
                                       for r in s["rows"] if kind in r] for kind in STYLES}
                         for name, s in summaries.items()}, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prune-fraction", type=float, default=0.3)
    p.add_argument("--rewind-to", default="10", help="'init' or an optimizer step")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--structured-rounds", type=int, default=2)
    p.add_argument("--structured-fraction", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default="outputs/bench_lottery")
    args = p.parse_args(argv)
    args.rewind_to = args.rewind_to if args.rewind_to == "init" else int(args.rewind_to)
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dm = DigitsDataModule()
    summaries, report = {}, {}
    for name in args.nets:
        results = [
            find_ticket(lambda name=name: NETS[name](args.lr), _trainer(args.epochs), dm, rounds=args.rounds,
                        prune_fraction=args.prune_fraction, rewind_to=args.rewind_to,
                        directory=Path(args.out) / f"{name}-s{seed}", seed=seed)
            for seed in args.seeds
        ]
        for res, seed in zip(results, args.seeds):
            print(f"\n{name} seed {seed}\n{res.table()}")
        summaries[name] = summarise(results)
        print_summary(name, summaries[name], len(args.seeds))
        sizes = [encoding_bytes(export_ticket(res.ticket(lambda name=name: NETS[name](args.lr)), res.masks), res.masks)
                 for res in results]
        print("final ticket bytes (fp32) dense / CSR / bitmap per seed: " + "; ".join(
            f"{z.dense} / {z.csr} / {z.bitmap} ({100 * z.density:.2f}% of parameters non-zero)" for z in sizes))
        summaries[name]["bytes"] = [(z.dense, z.csr, z.bitmap) for z in sizes]
        report[name] = summaries[name]
        if args.structured_rounds > 0:
            report[f"{name}-structured"] = structured(name, args, dm)
    plot(summaries, Path(args.out) / "lottery.png")
    (Path(args.out) / "summary.json").write_text(json.dumps(report, indent=1))
    print(f"\nsaved {Path(args.out) / 'lottery.png'} and summary.json")
    return report


if __name__ == "__main__":
    main()
