"""Compare training variants side by side in Weights & Biases (offline by default).

Each variant is ``NAME=EXTRA_ARGS``: LightningCLI arguments added on top of a base YAML. Every
variant runs for every seed, logs to its own W&B run (same ``group``, so the W&B UI overlays
them), and a summary table (mean ± std of the final metrics) is printed at the end::

    python -m examples.compare --config examples/configs/digits_convnet.yaml --seeds 0 1 \
        --variant "adam=" \
        --variant "sgd=--model.init_args.optimizer=sgd --model.init_args.lr=0.05" \
        --variant "onecycle=--trainer.callbacks+=pl_optim.callbacks.OneCycle --trainer.callbacks.max_lr=0.01"

Runs are written to ``--save-dir`` (default ``outputs/wandb``) in offline mode unless
``WANDB_MODE`` says otherwise; upload them later with ``wandb sync <save-dir>/wandb/offline-run-*``.
No API key is needed offline.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

from examples.cli import main as cli_main


@dataclass
class Variant:
    """A named set of extra CLI arguments."""

    name: str
    args: list[str]
    results: list[dict[str, float]] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    """``"name=--a=1 --b=2"`` -> Variant(name, ["--a=1", "--b=2"])."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not name.strip().replace("-", "_").replace(".", "_").isidentifier():
        raise argparse.ArgumentTypeError(f"`--variant` must look like NAME=ARGS with a plain NAME, got {text!r}")
    return Variant(name.strip(), shlex.split(rest))


def run_variant(variant: Variant, config: str, seed: int, project: str, group: str, save_dir: str) -> dict[str, float]:
    """Train one variant for one seed through the demo CLI; return its final scalar metrics."""
    args = [
        "fit",
        "--config", config,
        f"--seed_everything={seed}",
        *variant.args,
        "--trainer.logger=WandbLogger",
        f"--trainer.logger.init_args.project={project}",
        f"--trainer.logger.init_args.group={group}",
        f"--trainer.logger.init_args.name={variant.name}-seed{seed}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.logger.init_args.job_type=compare",
    ]
    t0 = time.perf_counter()
    cli = cli_main(args)
    seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    metrics["fit_seconds"] = seconds
    cli.trainer.logger.experiment.summary["fit_seconds"] = seconds
    cli.trainer.logger.experiment.finish()
    return metrics


def summarise(variants: list[Variant], keys: list[str]) -> str:
    """A plain-text table: one row a variant, mean ± std over seeds for each key."""
    header = ["variant", "seeds", *keys]
    rows = []
    for v in variants:
        cells = [v.name, str(len(v.results))]
        for key in keys:
            values = [r[key] for r in v.results if key in r]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def main(argv: list[str] | None = None) -> list[Variant]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/configs/digits_convnet.yaml", help="base LightningCLI YAML")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True, help="NAME=EXTRA_ARGS")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--project", default="pl_optim")
    parser.add_argument("--group", default=None, help="W&B group (default: compare-<time>)")
    parser.add_argument("--save-dir", default="outputs/wandb")
    parser.add_argument("--metrics", nargs="+", default=["val_acc", "val_loss", "fit_seconds"])
    ns = parser.parse_args(argv)
    if not os.path.isfile(ns.config):
        parser.error(f"`--config` {ns.config!r} is not a file")
    names = [v.name for v in ns.variant]
    if len(set(names)) != len(names):
        parser.error(f"`--variant` names must be unique, got {names}")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.makedirs(ns.save_dir, exist_ok=True)
    group = ns.group or time.strftime("compare-%Y%m%d-%H%M%S")
    for variant in ns.variant:
        for seed in ns.seeds:
            variant.results.append(run_variant(variant, ns.config, seed, ns.project, group, ns.save_dir))
    print(f"\n[compare] W&B group {group!r} ({os.environ['WANDB_MODE']}), runs in {ns.save_dir}")
    print(summarise(ns.variant, ns.metrics))
    return ns.variant


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
