"""Cost of each recipe check in optimizer-step equivalents (goal: the whole bundle <= 50 steps).

For the digits ConvNet and the ResNet-9 example (Page's widths by default, ``in_channels=1``)
on one batch of the digits (``--batch`` samples), with the checks' defaults: a step is one
``zero_grad`` + forward + cross-entropy + backward + ``Adam.step`` on the real model; each check
is timed as ``run_recipe`` runs it. Process CPU time with one thread (robust to other jobs on a
shared machine; wall time printed too), steps and checks interleaved, ``--reps`` repetitions per
seed, median over repetitions; printed per seed and as mean ± std over the seeds.

    python -m examples.benchmarks.bench_recipe                  # seeds 0 1 2, both models
    python -m examples.benchmarks.bench_recipe --models digits --seeds 0 --reps 2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from examples.data import DigitsDataModule
from examples.models import DigitsConvNet, ResNet9
from pl_optim.recipe import CHECKS
from pl_optim.recipe.core import prepare

warnings.filterwarnings("ignore")


def clocks() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def step_cost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 10) -> tuple[float, float]:
    """Median CPU and wall seconds of one training step (on a copy: the model stays as it is)."""
    import copy

    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    cpu, wall = [], []
    for k in range(steps + 2):
        c0, w0 = clocks()
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        c1, w1 = clocks()
        if k >= 2:  # warm-up
            cpu.append(c1 - c0)
            wall.append(w1 - w0)
    return statistics.median(cpu), statistics.median(wall)


def measure(make, x, y, seed: int, reps: int) -> dict[str, tuple[float, float]]:
    """check -> (CPU steps, wall steps), medians over ``reps``."""
    torch.manual_seed(seed)
    model = make()
    ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in CHECKS}
    statuses = {}
    for _ in range(reps):
        step_cpu, step_wall = step_cost(model, x, y)
        p = prepare(model, (x, y))
        for name, check in CHECKS.items():
            c0, w0 = clocks()
            statuses[name] = check(p).status
            c1, w1 = clocks()
            ratios[name].append(((c1 - c0) / step_cpu, (w1 - w0) / step_wall))
    out = {n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for n, v in ratios.items()}
    out["_statuses"] = statuses  # type: ignore[assignment]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["digits", "resnet9"], default=["digits", "resnet9"])
    parser.add_argument("--widths", type=int, nargs=4, default=[64, 128, 256, 512], help="ResNet-9 widths")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=args.batch)
    dm.setup()
    x, y = (t[: args.batch].contiguous() for t in dm.train_set.tensors)
    makers = {"digits": lambda: DigitsConvNet(), "resnet9": lambda: ResNet9(widths=tuple(args.widths), in_channels=1)}
    for name in args.models:
        per_seed = [measure(makers[name], x, y, s, args.reps) for s in args.seeds]
        print(f"\n{name} (batch {args.batch}, seeds {args.seeds}, {args.reps} reps): cost in optimizer steps, CPU time "
              "(wall in brackets)")
        totals_cpu = [sum(v[0] for k, v in r.items() if k != "_statuses") for r in per_seed]
        totals_wall = [sum(v[1] for k, v in r.items() if k != "_statuses") for r in per_seed]
        for check in CHECKS:
            cpu = [r[check][0] for r in per_seed]
            wall = [r[check][1] for r in per_seed]
            status = "/".join(sorted({r["_statuses"][check] for r in per_seed}))
            print(f"  {check:<20} {_ms(cpu)}  [{_ms(wall)}]  {status}")
        print(f"  {'bundle':<20} {_ms(totals_cpu)}  [{_ms(totals_wall)}]  goal <= 50: "
              f"{'met' if max(totals_cpu) <= 50 else 'NOT met'} (worst seed {max(totals_cpu):.1f})")


def _ms(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} ± {std:5.2f}"


if __name__ == "__main__":
    main()
