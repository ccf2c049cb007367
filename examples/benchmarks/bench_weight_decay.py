"""Cost of decoupled weight decay as a step hook: ``Adam + DecoupledDecay`` ÷ ``AdamW``.

Both optimizers use the foreach implementation and decay every parameter (``exclude_1d=False``),
so they do the same arithmetic; the difference is our hook (a Python pre/post hook, a
``torch._foreach_mul_`` per (device, dtype) bucket, and the weight_decay bookkeeping) against
AdamW's own ``_foreach_mul_``. Timed: ``optimizer.step()`` on fixed gradients (``--what step``),
or a whole training step, forward + backward + step (``--what train``). Reps of the two are
interleaved so drifts in machine load hit both alike; printed: the median ratio and its min–max
over the reps. A benchmark, not a test: run it and read the figure.

Usage::

    python -m examples.benchmarks.bench_weight_decay            # ~10M parameters, step only
    python -m examples.benchmarks.bench_weight_decay --what train --reps 30
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from examples.benchmarks._cli import (
    Progress,
    benchmark_parser,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from pl_optim import DecoupledDecay


def build_model(width: int = 2048) -> nn.Module:
    """MLP 1024 -> width -> width -> 1024 -> 1000 (9.45M parameters at width 2048)."""
    return nn.Sequential(
        nn.Linear(1024, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 1024), nn.ReLU(), nn.Linear(1024, 1000),
    )


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--reps", type=positive_int, default=60, help="timed, interleaved repetitions")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first")
    parser.add_argument("--what", choices=("step", "train"), default="step",
                        help="time optimizer.step() alone, or the whole training step")
    parser.add_argument("--wd", type=non_negative_float, default=0.1, help="weight decay λ of both")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch.set_num_threads")
    args = parser.parse_args(argv)
    progress = Progress("bench_weight_decay")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ref_model = build_model()
    our_model = build_model()
    our_model.load_state_dict(ref_model.state_dict())
    n_params = sum(p.numel() for p in ref_model.parameters())
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=args.wd, foreach=True)
    our_opt = torch.optim.Adam(our_model.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)
    DecoupledDecay(our_opt, args.wd, mode="lr", exclude_1d=False).attach()
    x, y = torch.randn(64, 1024), torch.randint(0, 1000, (64,))
    for model in (ref_model, our_model):
        nn.functional.cross_entropy(model(x), y).backward()  # fixed gradients for --what step

    def timed(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        start = time.perf_counter()
        if args.what == "train":
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed(ref_model, ref_opt)
        timed(our_model, our_opt)
    ratios, ref_times, our_times = [], [], []
    progress(f"timing {args.reps} interleaved repetitions of {args.what!r}")
    for rep in range(args.reps):
        pair = [(ref_model, ref_opt), (our_model, our_opt)]
        if rep % 2:  # alternate which goes first
            pair.reverse()
        times = {id(opt): timed(model, opt) for model, opt in pair}
        ref_times.append(times[id(ref_opt)])
        our_times.append(times[id(our_opt)])
        ratios.append(our_times[-1] / ref_times[-1])
    drift = max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(), our_model.parameters()))
    print(f"model: {n_params / 1e6:.2f}M parameters, timed: {args.what}, reps: {args.reps}, threads: {args.threads}")
    print(f"AdamW(foreach=True)          median {statistics.median(ref_times) * 1e3:8.2f} ms")
    print(f"Adam + DecoupledDecay        median {statistics.median(our_times) * 1e3:8.2f} ms")
    print(
        f"ratio (ours / AdamW): median {statistics.median(ratios):.3f}, "
        f"min-max {min(ratios):.3f}-{max(ratios):.3f}  (target <= 1.05)"
    )
    print(f"max |weight difference| after {args.reps + args.warmup} steps: {drift:.2e}")


if __name__ == "__main__":
    main()
