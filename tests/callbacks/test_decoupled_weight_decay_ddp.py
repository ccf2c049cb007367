"""DecoupledWeightDecay + AMSGradToggle under strategy='ddp' (2 CPU processes, gloo): both ranks
decay on every step that ran, switch AMSGrad at the same epoch, and end with identical weights.

The Trainer runs in a child script (this file run as ``__main__``) because Lightning's ddp
launcher re-executes the command line for rank 1; each rank writes what it saw to a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import DDP_TRAINER_KWARGS, end_ddp, read_ranks, run_ddp_script, write_rank


def _run(out: Path) -> None:
    import lightning.pytorch as pl
    import torch

    from examples.tiny import RandomClassificationData, TinyClassifier
    from pl_optim.callbacks import AMSGradToggle, DecoupledWeightDecay
    from pl_optim.steps import StepLedger

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    decay, toggle = DecoupledWeightDecay(0.3), AMSGradToggle({1: True})
    trainer = pl.Trainer(
        max_epochs=2, accumulate_grad_batches=2, callbacks=[decay, toggle], default_root_dir=str(out),
        **DDP_TRAINER_KWARGS,
    )
    model = TinyClassifier(optimizer="adam", lr=1e-2)
    # 256 samples / 16 a batch / 2 ranks = 8 batches a rank an epoch; accumulation 2 -> 4 steps
    trainer.fit(model, datamodule=RandomClassificationData())
    opt = trainer.optimizers[0]
    state = {
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
        "decay_steps": StepLedger.of(trainer.optimizers[0]).steps,
        "amsgrad": opt.param_groups[0]["amsgrad"],
        "max_state": all("max_exp_avg_sq" in s for s in opt.state.values()),
        "weight_decay": opt.param_groups[0]["weight_decay"],
    }
    write_rank(out, trainer.global_rank, state)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_decay_and_switch_identically(tmp_path):
    run_ddp_script(__file__, tmp_path)
    r0, r1 = read_ranks(tmp_path)
    assert r0 == r1
    assert r0["decay_steps"] == 8 and r0["amsgrad"] is True and r0["max_state"] is True
    assert r0["weight_decay"] == 0.3


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
    end_ddp()
