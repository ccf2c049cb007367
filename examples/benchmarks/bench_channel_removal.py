"""Benchmark: removing dead channels during training (SelfCompression(remove_channels=True)).

One float run and one self-compressing run of the digits ConvNet (same recipe as
``examples.compress_digits``: AdamW, cosine lr), then prints the issue-6 ratios, all measured in
this one run:

* % of weights and % of float bits kept, accuracy drop vs. float (target: <= 18%, <= 3%, <= 0.5 pp);
* last-epoch / first-epoch training time, and the epoch from which >= 75% of the weights are gone
  (target <= 0.5);
* CPU latency of the exported model / the float model, batch 1 and batch 256 (target <= 0.35);
* cost of one removal event in optimizer steps of time (target <= 5), and the one-off cost of
  tracing the network.

Usage::

    python -m examples.benchmarks.bench_channel_removal --epochs 30 --gamma 0.1
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback

from examples.compress_digits import DEFAULTS, CompressibleDigitsConvNet, _accuracy
from examples.data import DigitsDataModule
from examples.models import ResNet9
from pl_optim.callbacks import SelfCompression
from pl_optim.callbacks._channel_removal import ChannelRemoval
from pl_optim.compression import compression_stats, export_compressed

#: process CPU time: with one torch thread it is the compute this process did, robust to the
#: other processes sharing the machine (wall time is printed next to it).
CLOCK = time.process_time


class EpochClock(Callback):
    """CPU time of every training epoch and batch, % weights at each epoch end."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.walls: list[float] = []
        self.batches: list[float] = []
        self.weights: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t, self._w = CLOCK(), time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._b = CLOCK()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(CLOCK() - self._b)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(CLOCK() - self._t)
        self.walls.append(time.perf_counter() - self._w)
        if any("parametrizations" in n for n, _ in pl_module.named_parameters()):
            self.weights.append(float(compression_stats(pl_module.net)["weights_pct"]))


def _time_removals(monkey: list) -> None:
    """Record the wall time of every removal decision (graph build, removal event, plain decision)."""
    original = ChannelRemoval.after_step

    def timed(self, trainer, pl_module, repaired):
        had_graph, events = self.graph is not None, len(self.events)
        start = CLOCK()
        original(self, trainer, pl_module, repaired)
        kind = "trace" if not had_graph and self.graph is not None else "event" if len(self.events) > events else "decide"
        monkey.append((kind, CLOCK() - start))

    ChannelRemoval.after_step = timed


def _latency(nets: list[torch.nn.Module], batch: int, reps: int) -> list[float]:
    """Fastest forward of each net (interleaved, so load and clock drift hit all alike)."""
    x = torch.randn(batch, 1, 8, 8)
    best = [float("inf")] * len(nets)
    with torch.no_grad():
        for net in nets:
            net.eval()
            for _ in range(10):
                net(x)
        for _ in range(reps):
            for i, net in enumerate(nets):
                start = CLOCK()
                net(x)
                best[i] = min(best[i], CLOCK() - start)
    return best


class CompressibleResNet9(ResNet9):
    """The ResNet-9 shape on 1-channel digits with the same optimizer recipe as
    :class:`examples.compress_digits.CompressibleDigitsConvNet` (AdamW, cosine, quantiser group)."""

    configure_optimizers = CompressibleDigitsConvNet.configure_optimizers

    def __init__(self, epochs: int, quant_lr: float, widths: tuple[int, ...], **kwargs) -> None:
        super().__init__(widths=widths, in_channels=1, optimizer="adamw", **kwargs)
        self.epochs, self.quant_lr, self.exponent_lr = epochs, quant_lr, None


def run(gamma: float | None, args) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(batch_size=DEFAULTS["batch_size"])
    common = dict(epochs=args.epochs, quant_lr=args.quant_lr, lr=DEFAULTS["lr"], weight_decay=0.0)
    if args.model == "resnet9":
        model = CompressibleResNet9(widths=tuple(args.widths), **common)
    else:
        model = CompressibleDigitsConvNet(**common)
    clock = EpochClock()
    callbacks = [clock]
    if gamma is not None:
        callbacks.append(SelfCompression(gamma, init_bits=DEFAULTS["init_bits"], plot_path=False, remove_channels=True,
                                         removal_interval=args.interval, shift_decay=args.shift_decay))
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    out = {"model": model, "clock": clock, "acc": _accuracy(model.net, dm), "dm": dm}
    if gamma is not None:
        out["callback"] = callbacks[1]
        out["stats"] = compression_stats(model.net)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quant-lr", type=float, default=DEFAULTS["quant_lr"])
    parser.add_argument("--interval", type=int, default=1, help="removal_interval (optimizer steps)")
    parser.add_argument("--shift-decay", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=["digits", "resnet9"], default="digits")
    parser.add_argument("--widths", type=int, nargs=4, default=[32, 64, 128, 256], help="ResNet-9 widths")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    decisions: list = []
    _time_removals(decisions)
    base = run(None, args)
    comp = run(args.gamma, args)
    cb, stats, clock = comp["callback"], comp["stats"], comp["clock"]

    print(f"{args.model} ({'widths ' + str(args.widths) if args.model == 'resnet9' else 'channels 32, 64, 64'}), gamma={args.gamma:g}, {args.epochs} epochs, removal every {args.interval} step(s)")
    dead = ChannelRemoval.dead(comp["model"])
    print("channels (before -> after, dead but still there): " + ", ".join(
        f"{c['layer']} {c['channels_before']}->{c['channels_after']} ({int(dead[c['layer']].sum())})"
        for c in cb.channels if c["layer"] in dead))
    drop = 100 * (base["acc"] - comp["acc"])
    print(f"accuracy: float {100 * base['acc']:.2f}% | compressed {100 * comp['acc']:.2f}% (drop {drop:+.2f} pp)")
    print(f"weights kept {stats['weights_pct']:.2f}% (target <= 18%) | bits kept {stats['bits_pct']:.2f}% "
          f"(target <= 3%) | drop <= 0.5 pp: {'yes' if drop <= 0.5 else 'no'}")
    params_float = sum(p.numel() for p in base["model"].net.parameters())
    exported = export_compressed(comp["model"].net, torch.zeros(2, 1, 8, 8))
    params_small = sum(p.numel() for p in exported.parameters())
    print(f"exported parameters {params_small} vs float {params_float} ({100 * params_small / params_float:.1f}%); "
          f"exported acc {100 * _accuracy(exported, comp['dm']):.2f}%")

    gone75 = next((i for i, w in enumerate(clock.weights) if w <= 25.0), None)
    ratio = clock.epochs[-1] / clock.epochs[0]
    base_ratio = base["clock"].epochs[-1] / base["clock"].epochs[0]
    per_epoch = len(clock.batches) // args.epochs
    first, last = (statistics.median(clock.batches[i * per_epoch:(i + 1) * per_epoch]) for i in (0, args.epochs - 1))
    print(f"epoch CPU time: first {clock.epochs[0]:.3f} s, last {clock.epochs[-1]:.3f} s, last/first {ratio:.2f} "
          f"(target <= 0.5; the float run's own last/first is {base_ratio:.2f}: the first epoch carries warm-up); "
          f"wall last/first {clock.walls[-1] / clock.walls[0]:.2f}")
    full = max(i for i, w in enumerate(clock.weights) if w >= 99.99) if clock.weights[0] >= 99.99 else 0
    print(f"warm-up-free: last epoch / last full-size epoch ({full}) CPU time {clock.epochs[-1] / clock.epochs[full]:.2f}")
    print(f"median step CPU time: first epoch {1e3 * first:.2f} ms, last epoch {1e3 * last:.2f} ms, last/first "
          f"{last / first:.2f}; >= 75% of weights gone from epoch {gone75 if gone75 is not None else 'never'}; "
          "% weights per epoch: " + " ".join(f"{w:.0f}" for w in clock.weights))

    for batch, reps in ((1, 300), (256, 50)):
        t_float, t_small = _latency([base["model"].net, exported], batch, reps)
        print(f"CPU latency (process time, fastest of {reps}) batch {batch}: exported {1e3 * t_small:.3f} ms / float {1e3 * t_float:.3f} ms = "
              f"{t_small / t_float:.2f} (target <= 0.35)")

    step = statistics.median(clock.batches)
    events = [t for k, t in decisions if k == "event"]
    plain = [t for k, t in decisions if k == "decide"]
    trace = [t for k, t in decisions if k == "trace"]
    if events:
        print(f"removal event: median {1e3 * statistics.median(events):.2f} ms = "
              f"{statistics.median(events) / step:.2f} optimizer steps (median step {1e3 * step:.2f} ms; target <= 5); "
              f"worst {max(events) / step:.2f} steps; {len(events)} events")
    print(f"decision without removal: median {1e3 * statistics.median(plain):.3f} ms = "
          f"{statistics.median(plain) / step:.3f} steps; one-off trace {1e3 * sum(trace):.1f} ms")
    return {"ratio": ratio, "step_ratio": last / first, "weights_pct": stats["weights_pct"], "bits_pct": stats["bits_pct"], "drop": drop}


if __name__ == "__main__":
    main()
