"""Per-step wall time: the OneCycle callback vs. torch's OneCycleLR returned by configure_optimizers.

Both runs train the same tiny MLP (SGD with momentum) for the same number of steps with the same
1cycle schedule (lr and momentum); runs alternate (ours, torch, ours, torch, ...) so that drifts
in machine load hit both alike. A step's time is the wall time between consecutive
``on_train_batch_start`` calls (forward, backward, optimizer step, scheduler update and loop
overhead), the first ``--warmup`` steps of a run excluded; a run's figure is the median of its
steps. Prints median and min-max over the repetitions and the ratio ours / torch (target <= 1.02).

    python -m examples.benchmarks.bench_one_cycle            # defaults: 9 repetitions x 400 steps
    python -m examples.benchmarks.bench_one_cycle --reps 15 --steps 600
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim.callbacks import OneCycle

warnings.filterwarnings("ignore")


class StepTimer(pl.Callback):
    """Wall time and process CPU time between consecutive batch starts."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.wall, self.cpu, self._last = warmup, [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None and trainer.global_step > self.warmup:
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
        self._last = now


class TorchOneCycle(TinyClassifier):
    def __init__(self, total: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.total = total

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run(kind: str, steps: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup)
    callbacks = [timer] + ([OneCycle(0.1)] if kind == "ours" else [])
    model = TinyClassifier(optimizer="sgd", lr=0.1) if kind == "ours" else TorchOneCycle(steps, optimizer="sgd", lr=0.1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(model, datamodule=RandomClassificationData(n=4096, batch_size=16))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return statistics.median(timer.wall), statistics.median(timer.cpu), weights


def update_cost(n: int = 20000) -> tuple[float, float]:
    """Microseconds of one schedule update alone: torch ``OneCycleLR.step()`` vs the callback's
    ``GroupWriter.apply`` (what ``OneCycle.after_step`` runs), same optimizer, no Lightning."""
    import timeit

    from pl_optim.param_groups import GroupWriter
    from pl_optim.schedules import one_cycle

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=10 * n)
    t_torch = min(timeit.repeat(sched.step, number=n, repeat=3)) / n
    lr, mom = one_cycle(0.1)
    writer, step = GroupWriter(opt, {"lr": lr, "momentum": mom}), iter(range(10 * n))
    t_ours = min(timeit.repeat(lambda: writer.apply(next(step), 10 * n), number=n, repeat=3)) / n
    return t_ours, t_torch


def ledger_cost(rounds: int = 40, n: int = 2000) -> tuple[float, float, float]:
    """Microseconds the step ledger adds to one ``optimizer.step()`` of a tiny SGD (a no-op
    subscriber attached), without and with a closure (Lightning's automatic optimization), and a
    bare step's time. Bare and ledger-carrying optimizers alternate in ``rounds`` interleaved
    rounds of ``n`` steps; each figure is the median over rounds of the per-round difference."""
    import timeit

    from pl_optim.steps import StepLedger

    def make():
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        return torch.optim.SGD([p], lr=0.0, momentum=0.9)

    bare, hooked = make(), make()
    StepLedger.of(hooked).subscribe(after=lambda o: None)
    closure = lambda: None  # noqa: E731
    plain, with_closure, base = [], [], []
    for _ in range(rounds):
        t_bare = timeit.timeit(bare.step, number=n) / n
        t_ledger = timeit.timeit(hooked.step, number=n) / n
        t_bare_c = timeit.timeit(lambda: bare.step(closure), number=n) / n
        t_ledger_c = timeit.timeit(lambda: hooked.step(closure), number=n) / n
        plain.append(t_ledger - t_bare)
        with_closure.append(t_ledger_c - t_bare_c)
        base.append(t_bare)
    return statistics.median(plain), statistics.median(with_closure), statistics.median(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall: dict[str, list[float]] = {"ours": [], "torch": []}
    cpu: dict[str, list[float]] = {"ours": [], "torch": []}
    run("ours", 50, 5), run("torch", 50, 5)  # warm caches and imports
    same = True
    for rep in range(args.reps):
        order = ("ours", "torch") if rep % 2 == 0 else ("torch", "ours")
        weights = {}
        for kind in order:
            w, c, weights[kind] = run(kind, args.steps, args.warmup)
            wall[kind].append(w)
            cpu[kind].append(c)
        same = same and torch.equal(weights["ours"], weights["torch"])
    print(f"OneCycle callback vs torch OneCycleLR, TinyClassifier (195 parameters), SGD(momentum), "
          f"{args.steps} steps x {args.reps} interleaved repetitions, torch threads = 1")
    for label, table in (("wall", wall), ("cpu", cpu)):
        for kind, ts in table.items():
            print(f"  {label:>4} {kind:>5}: median {statistics.median(ts) * 1e6:8.1f} us/step   "
                  f"min-max {min(ts) * 1e6:.1f}-{max(ts) * 1e6:.1f}")
        ratios = [a / b for a, b in zip(table["ours"], table["torch"])]
        print(f"  {label:>4} ratio ours/torch: median {statistics.median(ratios):.3f}  "
              f"(min-max over paired repetitions {min(ratios):.3f}-{max(ratios):.3f}; target <= 1.02)")
    print(f"  final weights bit-identical in every repetition: {same}")
    ours, theirs = update_cost()
    print(f"  schedule update alone: GroupWriter.apply {ours * 1e6:.2f} us vs OneCycleLR.step {theirs * 1e6:.2f} us "
          "(the rest of the difference is Lightning calling one more callback's hooks)")
    cost, cost_closure, bare = ledger_cost()
    print(f"  step ledger's own cost per optimizer step: {cost * 1e6:.2f} us (with a closure, as under Lightning: "
          f"{cost_closure * 1e6:.2f} us); a bare SGD step on 3 parameters takes {bare * 1e6:.2f} us")
    print("  (wall time is the figure asked for; process CPU time leaves out the time the process waited "
          "for a core while other jobs ran)")

if __name__ == "__main__":
    main()
