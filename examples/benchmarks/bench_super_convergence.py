"""Epochs to a target accuracy: constant Adam 3e-4, constant Adam at a tuned lr, and 1cycle + decoupled decay.

For each seed:

* constant recipes: the first epoch whose val accuracy reaches ``--target`` (one run of
  ``--max-epochs``);
* 1cycle (max_lr 0.01, pct_start 0.25, beta1 0.95->0.85->0.95, beta2 0.99, decoupled decay 0.01):
  its schedule depends on the budget, so one run per budget in ``--budgets``; reported is the
  smallest budget whose FINAL accuracy reaches the target (and, for reference, the first epoch
  that reaches it inside the largest budget).

Printed: a table per recipe (median [min–max] over seeds) and the ratio
``epochs(constant Adam 3e-4) / epochs(1cycle)`` per seed with its median and spread. Runs go
through :func:`examples.compare.run_study` (2 workers, 1 torch thread each, resumable: finished
runs in ``outputs/bench_super_convergence/<task>/runs`` are reused, delete the folder to start
over), W&B disabled unless ``--wandb`` is given.

Tasks:

* ``digits``: the demo DigitsConvNet (32, 64, 64) on sklearn's digits (1,438 train images).
* ``resnet9``: the ResNet-9 example at CPU widths (16, 32, 64, 128) on the same digits.
* ``hard``: harder digits for a CPU — 400 training images, 20% of their labels replaced by a
  random other class, random ±1 pixel shifts; clean validation set (:class:`HardDigitsDataModule`).
* ``few``: the same 400 images and shifts without label noise.
* ``cifar10``: ResNet-9 (64, 128, 256, 512) on CIFAR-10 from ``--cifar-dir`` (GPU recommended;
  nothing is downloaded).

Usage::

    python -m examples.benchmarks.bench_super_convergence --task digits --seeds 0 1 2
    python -m examples.benchmarks.bench_super_convergence --task hard --seeds 0 1 2 --max-epochs 40
    python -m examples.benchmarks.bench_super_convergence --task cifar10 --cifar-dir ~/data --threads 8
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from examples.benchmarks import _cli as cli
from examples.compare import run_study
from examples.data import DigitsDataModule
from examples.studies import Study, epochs_to_target
from pl_optim.checks import in_range, integer

ONE_CYCLE = (
    "--trainer.callbacks+=pl_optim.callbacks.OneCycle --trainer.callbacks.max_lr=0.01 "
    "--trainer.callbacks.pct_start=0.25 --trainer.callbacks.beta2=0.99 "
    "--trainer.callbacks+=pl_optim.callbacks.DecoupledWeightDecay --trainer.callbacks.weight_decay=0.01"
)


class ShiftedDigits(Dataset):
    """Images shifted by a random offset in ``[-shift, shift]`` pixels (zero fill) on each access."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shift: int) -> None:
        self.x, self.y, self.shift = x, y, shift

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img, s = self.x[i], self.shift
        if s:
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            padded = torch.nn.functional.pad(img, (s, s, s, s), value=float(self.x.min()))
            img = padded[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
        return img, self.y[i]


class HardDigitsDataModule(DigitsDataModule):
    """Digits made harder for CPU benchmarks: few training images, noisy labels, random shifts.

    The validation set is the usual clean 20%; the training set keeps ``train_size`` images (a
    fixed subset), replaces a ``label_noise`` share of their labels by a random other class (fixed
    per ``seed``), and shifts every image by up to ``shift`` pixels each time it is drawn.

    Args:
        train_size: training images kept (at most 1,438).
        label_noise: share of training labels replaced, in [0, 1).
        shift: maximal random shift in pixels (0: no augmentation).
        **kwargs: :class:`examples.data.DigitsDataModule` arguments.
    """

    def __init__(self, train_size: int = 400, label_noise: float = 0.2, shift: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_size = integer("train_size", train_size, minimum=1)
        self.label_noise = in_range("label_noise", label_noise, 0.0, 1.0, high_open=True)
        self.shift = integer("shift", shift, minimum=0)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None and not isinstance(self.train_set, TensorDataset):
            return
        super().setup(stage)
        x, y = self.train_set.tensors
        g = torch.Generator().manual_seed(self.seed + 1)
        keep = torch.randperm(len(x), generator=g)[: self.train_size]
        x, y = x[keep], y[keep].clone()
        noisy = torch.rand(len(y), generator=g) < self.label_noise
        y[noisy] = (y[noisy] + torch.randint(1, self.num_classes, (int(noisy.sum()),), generator=g)) % self.num_classes
        self.train_set = ShiftedDigits(x, y, self.shift)


def base_config(task: str, cifar_dir: str | None) -> dict:
    trainer = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "callbacks": []}
    digits = {"class_path": "examples.data.DigitsDataModule", "init_args": {"batch_size": 64, "seed": 0}}
    if task == "digits":
        model = {"class_path": "examples.models.DigitsConvNet", "init_args": {"channels": [32, 64, 64]}}
        data = digits
    elif task == "resnet9":
        model = {"class_path": "examples.models.ResNet9", "init_args": {"widths": [16, 32, 64, 128], "in_channels": 1}}
        data = digits
    elif task in ("hard", "few"):
        model = {"class_path": "examples.models.DigitsConvNet", "init_args": {"channels": [32, 64, 64]}}
        noise = 0.2 if task == "hard" else 0.0
        data = {"class_path": f"{__name__}.HardDigitsDataModule",
                "init_args": {"batch_size": 32, "seed": 0, "train_size": 400, "label_noise": noise, "shift": 1}}
    else:
        if not cifar_dir:
            raise SystemExit("error: `--task cifar10` needs `--cifar-dir` (a folder holding cifar-10-batches-py)")
        model = {"class_path": "examples.models.ResNet9", "init_args": {"widths": [64, 128, 256, 512], "in_channels": 3}}
        data = {"class_path": "examples.data.CIFAR10DataModule", "init_args": {"data_dir": cifar_dir, "batch_size": 512}}
        trainer["accelerator"] = "auto"
    model["init_args"]["optimizer"] = "adam"
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


def build_study(task: str, max_epochs: int, budgets: list[int], tuned_lr: float, target: float,
                cifar_dir: str | None) -> Study:
    variants = {
        "adam_3e-4": f"--trainer.max_epochs={max_epochs} --model.init_args.lr=0.0003",
        f"adam_{tuned_lr:g}": f"--trainer.max_epochs={max_epochs} --model.init_args.lr={tuned_lr}",
        **{f"one_cycle_e{b}": f"--trainer.max_epochs={b} {ONE_CYCLE}" for b in budgets},
    }
    return Study(name=task, version=1, config=base_config(task, cifar_dir), variants=variants, baseline="adam_3e-4",
                 target=target, description=f"bench_super_convergence, task {task}")


def spread(values: list[float]) -> str:
    """``"median [min–max]"`` (``"-"`` for none)."""
    if not values:
        return "-"
    return f"{statistics.median(values):.3g} [{min(values):.3g}–{max(values):.3g}]"


def summarise(study: Study, records: list[dict], seeds: list[int], budgets: list[int], max_epochs: int,
              tuned: str) -> str:
    """The epochs-to-target table and the ratio line (per seed, median and min–max)."""
    runs = {(r["variant"], r["seed"]): r for r in records}

    def first(variant: str, seed: int) -> int | None:
        r = runs.get((variant, seed))
        return None if r is None else epochs_to_target(r["history"], "val_acc", study.target)

    def smallest_budget(seed: int) -> int | None:
        for b in sorted(budgets):
            r = runs.get((f"one_cycle_e{b}", seed))
            if r is not None and r["final"].get("val_acc", 0.0) >= study.target:
                return b
        return None

    rows, ratios, lower = [], [], []
    per_seed = {s: (first("adam_3e-4", s), first(tuned, s), smallest_budget(s), first(f"one_cycle_e{max(budgets)}", s))
                for s in seeds}
    names = ["constant Adam 3e-4 (first epoch)", f"constant {tuned} (first epoch)",
             "1cycle + wd (smallest budget)", f"1cycle + wd e{max(budgets)} (first epoch)"]
    for i, name in enumerate(names):
        hits = [per_seed[s][i] for s in seeds]
        reached = [h for h in hits if h is not None]
        rows.append(f"{name:<40} {spread(reached):<16} reached {len(reached)}/{len(hits)}")
    for s in seeds:
        slow, fast = per_seed[s][0], per_seed[s][2]
        if slow is not None and fast is not None:
            ratios.append(slow / fast)
        elif fast is not None:
            lower.append(f"seed {s}: > {max_epochs}/{fast}")
    finals = {v: [runs[(v, s)]["final"]["val_acc"] for s in seeds if (v, s) in runs] for v in study.variants}
    acc = "; ".join(f"{v} {statistics.fmean(a):.4f}±{statistics.stdev(a) if len(a) > 1 else 0:.4f}"
                    for v, a in finals.items() if a)
    lines = [
        f"task {study.name}: epochs to val_acc >= {study.target:g} over seeds {seeds} (median [min–max])",
        *rows,
        f"ratio epochs(constant Adam 3e-4) / epochs(1cycle smallest budget): per seed "
        f"{[round(r, 2) for r in ratios]} -> median {spread(ratios)}" + (f"; not reached by Adam 3e-4: {lower}" if lower else ""),
        f"final val_acc (mean±std): {acc}",
    ]
    return "\n".join(lines)


DEFAULTS = {  # task: (max_epochs, budgets, tuned lr, target)
    "digits": (12, [1, 2, 3, 4, 6, 8], 3e-3, 0.986),
    "resnet9": (12, [1, 2, 3, 4, 6, 8], 3e-3, 0.986),
    "hard": (40, [5, 10, 15, 20, 30], 3e-3, 0.93),
    "few": (30, [3, 5, 8, 12, 20], 3e-3, 0.95),
    "cifar10": (100, [10, 20, 30, 50], 3e-3, 0.94),
}


def main(argv: list[str] | None = None) -> str:
    parser = cli.benchmark_parser(__doc__)
    parser.add_argument("--task", choices=tuple(DEFAULTS), default="digits", help="data set and model")
    parser.add_argument("--seeds", type=cli.non_negative_int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument("--max-epochs", type=cli.positive_int, help="epochs of the constant-lr runs (None: the task's)")
    parser.add_argument("--budgets", type=cli.positive_int, nargs="+", help="epoch budgets of the 1cycle runs (None: the task's)")
    parser.add_argument("--tuned-lr", type=cli.positive_float, help="lr of the tuned constant recipe (None: the task's)")
    parser.add_argument("--target", type=cli.fraction, help="val accuracy to reach (None: the task's)")
    parser.add_argument("--workers", type=cli.positive_int, default=2, help="worker processes")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads per worker")
    parser.add_argument("--cifar-dir", default=None, help="local CIFAR-10 folder (task cifar10)")
    parser.add_argument("--out", default="outputs/bench_super_convergence", help="output folder")
    parser.add_argument("--wandb", default="disabled", help="W&B mode (disabled, offline, online)")
    ns = parser.parse_args(argv)
    max_epochs, budgets, tuned_lr, target = DEFAULTS[ns.task]
    max_epochs, budgets = ns.max_epochs or max_epochs, ns.budgets or budgets
    tuned_lr, target = ns.tuned_lr or tuned_lr, ns.target or target
    study = build_study(ns.task, max_epochs, budgets, tuned_lr, target, ns.cifar_dir)
    progress = cli.Progress("bench_super_convergence")
    progress(f"{ns.task}: {len(study.variants)} recipes x {len(ns.seeds)} seeds on {ns.workers} worker(s)")
    result = run_study(study, ns.seeds, workers=ns.workers, out=ns.out, wandb=ns.wandb, threads=ns.threads,
                       command="python -m examples.benchmarks.bench_super_convergence " + " ".join(sys.argv[1:]))
    progress("epochs to target")
    text = summarise(study, result["records"], ns.seeds, budgets, max_epochs, f"adam_{tuned_lr:g}")
    print(text)
    (Path(ns.out) / ns.task / "epochs_to_target.txt").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
