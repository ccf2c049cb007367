"""Precision plugins: accuracy of pure bf16 where bf16-true stalls, bytes per parameter, step cost.

Three measurements, printed (a benchmark, not a test):

1. **Accuracy** (raw torch loop, the same core the plugin uses): least-squares regression
   ``y = X·w* + noise`` (512 samples, 64 features, noise std 0.3), ``Linear(64, 1)`` from zero,
   AdamW (decoupled decay 0.01) with a one-cycle lr (peak 1e-2, 3000 steps: a long tail far below a
   bf16 ulp of the weights). Final training MSE (computed in float32 from the stored weights) for
   fp32, plain bf16 (params/grads/state bf16, no compensation = ``bf16-true``), and pure bf16 with
   ``kahan`` / ``stochastic`` / ``none``; over ``--seeds`` seeds.
2. **Memory**: bytes per parameter held between steps by params + grads + Adam state (+
   compensation) for a 1M-parameter MLP: 16-mixed (fp32 master weights, grads and state) vs pure bf16
   with each compensation (tensors measured with :func:`pl_optim.precision.held_bytes`).
3. **Overhead** (Lightning, CPU, 1 thread): step time of ``LossScaledMixedPrecision("cpu")`` ÷
   Lightning's ``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))``, and
   ``PureBF16("kahan"/"stochastic")`` ÷ ``HalfPrecision("bf16-true")``; per run the median batch
   time, runs interleaved, median over ``--reps`` runs (per-run ratio range printed).

Usage::

    python -m examples.benchmarks.bench_precision                 # ~2-3 min on 1 CPU thread
    python -m examples.benchmarks.bench_precision --seeds 1 --reps 3 --steps 1000   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from pl_optim import one_cycle
from pl_optim.precision import CompensatedUpdate, held_bytes

VARIANTS = ("fp32", "bf16-true", "pure-none", "pure-kahan", "pure-stochastic")


def regression(variant: str, seed: int, steps: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    w_star = torch.randn(64, 1, generator=g)
    y = x @ w_star + 0.3 * torch.randn(512, 1, generator=g)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    model = nn.Linear(64, 1).to(dtype)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if variant.startswith("pure-"):
        CompensatedUpdate(opt, variant.removeprefix("pure-"), seed=seed)
    lr_schedule, _ = one_cycle(1e-2, pct_start=0.1)
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_schedule(k, steps)
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx].to(dtype)).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(nn.functional.mse_loss(x @ model.weight.float().T + model.bias.float(), y))


def memory() -> dict[str, float]:
    out = {}
    for name in ("16-mixed", "pure-kahan", "pure-stochastic", "pure-none"):
        model = nn.Sequential(nn.Linear(1000, 500), nn.ReLU(), nn.Linear(500, 1000))
        model = model if name == "16-mixed" else model.to(torch.bfloat16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name != "16-mixed":
            CompensatedUpdate(opt, name.removeprefix("pure-"))
        x = torch.randn(8, 1000)
        with torch.autocast("cpu", dtype=torch.float16, enabled=name == "16-mixed"):
            model(x if name == "16-mixed" else x.bfloat16()).float().sum().backward()
        opt.step()
        out[name] = held_bytes([opt])["bytes_per_param"]
    return out


def lightning_step_times(reps: int, steps: int = 30) -> dict[str, list[float]]:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import HalfPrecision, MixedPrecision

    from examples.tiny import RandomClassificationData, TinyClassifier
    from pl_optim.callbacks import LossScaledMixedPrecision, PureBF16

    class Timer(pl.Callback):
        """Median duration of a training batch (forward, backward, step), after 5 warm-up batches;
        the median of a run's batches resists the load spikes of a shared machine."""

        def __init__(self):
            self.durations = []

        def on_train_batch_start(self, trainer, *args):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            self.durations.append(time.perf_counter() - self.t0)

        def on_train_end(self, trainer, *args):
            self.per_step = statistics.median(self.durations[5:])

    plugins = {
        "lightning-16-mixed": lambda: MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")),
        "ours-16-mixed": lambda: LossScaledMixedPrecision("cpu"),
        "lightning-bf16-true": lambda: HalfPrecision("bf16-true"),
        "pure-kahan": lambda: PureBF16("kahan"),
        "pure-stochastic": lambda: PureBF16("stochastic"),
    }
    times: dict[str, list[float]] = {k: [] for k in plugins}
    data = RandomClassificationData(n=64 * (steps + 5), shape=(256,), num_classes=10, batch_size=64)
    for _ in range(reps):
        for name, make in plugins.items():
            pl.seed_everything(0, verbose=False)
            timer = Timer()
            trainer = pl.Trainer(accelerator="cpu", max_steps=steps + 5, logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                                 plugins=[make()], callbacks=[timer])
            trainer.fit(TinyClassifier(features=256, hidden=1024, num_classes=10), datamodule=data)
            times[name].append(timer.per_step)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    print(f"1. regression MSE after {args.steps} AdamW + one-cycle steps (seeds 0..{args.seeds - 1})")
    losses = {v: [regression(v, s, args.steps) for s in range(args.seeds)] for v in VARIANTS}
    for v in VARIANTS:
        rel = [(a - b) / b * 100 for a, b in zip(losses[v], losses["fp32"])]
        print(f"   {v:16s} MSE " + " ".join(f"{x:.5f}" for x in losses[v])
              + f"   vs fp32: {statistics.mean(rel):+.2f}% (min {min(rel):+.2f}, max {max(rel):+.2f})")

    print("2. bytes per parameter held (params + grads + Adam state + compensation), 1.0M-param MLP")
    for name, b in memory().items():
        print(f"   {name:16s} {b:.2f}")

    print(f"3. Lightning batch time on CPU (MLP 256-1024-10, batch 64; per run the median of 30 batches; "
          f"median over {args.reps} interleaved runs)")
    times = lightning_step_times(args.reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"   {k:20s} {med[k] * 1e3:.3f} ms/step  (min {min(v) * 1e3:.3f}, max {max(v) * 1e3:.3f})")
    ratios = [a / b for a, b in zip(times["ours-16-mixed"], times["lightning-16-mixed"])]
    print(f"   ours-16-mixed / lightning-16-mixed: {med['ours-16-mixed'] / med['lightning-16-mixed']:.3f} "
          f"(per-rep min {min(ratios):.3f}, max {max(ratios):.3f})")
    for k in ("pure-kahan", "pure-stochastic"):
        print(f"   {k} / lightning-bf16-true: {med[k] / med['lightning-bf16-true']:.3f}")


if __name__ == "__main__":
    main()
