"""LightningCLI entry point of the demo: any model/datamodule of ``examples`` and any callback of
the bundle from the command line or a YAML config.

    python -m examples.cli fit --config examples/configs/digits_convnet.yaml
    python -m examples.cli fit --config examples/configs/digits_convnet.yaml \
        --trainer.max_epochs=3 --model.init_args.lr=0.01
    python -m examples.cli fit --model examples.models.ResNet9 --model.widths='[16,32,64,128]' \
        --model.in_channels=1 --data examples.data.DigitsDataModule

Bad arguments end with one ``error: ...`` line and exit status 2.

Weights & Biases runs offline unless you opt in: ``WANDB_MODE`` unset means ``offline`` (no
account or API key needed; ``wandb sync outputs/wandb/offline-run-*`` uploads later). Export
``WANDB_MODE=online`` to log live.
"""

from __future__ import annotations

import os
import sys
import time
from argparse import ArgumentError

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


class DemoCLI(LightningCLI):
    """LightningCLI that times ``fit`` and prints what the run achieved."""

    def before_fit(self) -> None:
        self._t0 = time.perf_counter()

    def after_fit(self) -> None:
        seconds = time.perf_counter() - self._t0
        trainer, model = self.trainer, self.model
        if trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"[demo] {type(model).__name__}: {n_params:,} parameters, {trainer.current_epoch} epochs, "
            f"{trainer.global_step} optimizer steps in {seconds:.1f}s"
        )
        for key in sorted(metrics):
            print(f"[demo]   {key} = {metrics[key]:.4f}")
        for callback in trainer.callbacks:  # SelfCompression(remove_channels=True): widths before -> after
            for c in getattr(callback, "channels", None) or []:
                if c["channels_before"] != c["channels_after"]:
                    print(f"[demo]   channels {c['layer']} = {c['channels_before']} -> {c['channels_after']}")


def main(args: list[str] | None = None) -> DemoCLI:
    """Run the CLI; user errors become one line on stderr and exit status 2. W&B is offline unless
    ``WANDB_MODE`` is set."""
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        return DemoCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_callback=None,
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except (ArgumentError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)


def one_line(message: str) -> str:
    """Boil jsonargparse's multi-line union report down to one line that names the problem."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    errors = [line[2:] for line in lines if line.startswith("- ") and "<class 'NoneType'>" not in line]
    if errors and all(not e.startswith("Expected a ") for e in errors):
        return "; ".join(errors)  # our own ValueErrors already name the argument and value
    key = next((line for line in lines if line.startswith("Parser key")), "")
    given = next((line for line in lines if line.startswith("Given value:")), "")
    return " ".join(part.rstrip(":") for part in (key, *errors, given) if part) or lines[0]


if __name__ == "__main__":
    main()
