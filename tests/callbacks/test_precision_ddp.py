"""Precision plugins under strategy='ddp' (2 CPU processes, gloo): our fp16 (CPU GradScaler) and
pure bf16 (Kahan, stochastic rounding) skip the same injected inf step on both ranks, count the same
steps, and end with identical weights (stochastic rounding uses the same seed on every rank; the
model's parameters keep their dtype and autograd hooks, which DDP's reducer needs).

Run in a child script (this file as ``__main__``) because Lightning's ddp launcher re-executes the
command line for rank 1; each rank writes what it saw to a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import DDP_TRAINER_KWARGS, end_ddp, read_ranks, run_ddp_script, write_rank

PLUGINS = ("16-mixed", "kahan", "stochastic")


def _run(out: Path, names: tuple[str, ...] = PLUGINS) -> None:
    import lightning.pytorch as pl
    import torch

    from examples.tiny import RandomClassificationData, TinyClassifier
    from pl_optim.callbacks import DecoupledWeightDecay, LossScaledMixedPrecision, OneCycle, PureBF16
    from pl_optim.steps import StepLedger
    from tests.callbacks._precision_common import InjectAtStep

    torch.set_num_threads(1)
    from lightning.pytorch.plugins import HalfPrecision

    for name in names:
        pl.seed_everything(0, verbose=False)
        if name == "16-mixed":
            plugin = LossScaledMixedPrecision("cpu")
        else:
            plugin = HalfPrecision("bf16-true") if name == "bf16-true" else PureBF16(name)
        cycle = OneCycle(max_lr=0.02)
        trainer = pl.Trainer(max_epochs=1, plugins=[plugin], callbacks=[cycle, DecoupledWeightDecay(0.1), InjectAtStep(2)],
                             default_root_dir=str(out), **DDP_TRAINER_KWARGS)
        model = TinyClassifier(optimizer="adam", lr=1e-2)
        trainer.fit(model, datamodule=RandomClassificationData())  # 8 batches a rank
        ledger = StepLedger.of(trainer.optimizers[0])
        state = {
            "weights": [p.detach().float().flatten().tolist() for p in model.parameters()],
            "counts": [ledger.steps, ledger.skipped, trainer.global_step, getattr(plugin, "skipped_steps", 0),
                       cycle.step_positions()[0]],
        }
        write_rank(out, trainer.global_rank, state, f"{name}-")


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_skip_and_end_identically(tmp_path):
    run_ddp_script(__file__, tmp_path)
    for name in PLUGINS:
        r0, r1 = read_ranks(tmp_path, f"{name}-")
        assert r0["counts"] == r1["counts"] == [7, 1, 7, 1, 7], name
        assert r0["weights"] == r1["weights"], name


if __name__ == "__main__":
    _run(Path(sys.argv[1]), tuple(sys.argv[2:]) or PLUGINS)
    end_ddp()
