"""OneCycle under DDP (2 CPU processes, gloo): the derived total is per rank (the
DistributedSampler halves the batches), both ranks end at the same position and values, and
``max_lr="find"`` gives both ranks rank 0's LR range test suggestion.

The Trainer runs in a child script (this file run as ``__main__``, ``strategy="ddp"``) that
destroys the process group before it exits: the ``ddp_spawn`` form of this test once aborted
rank 1 at teardown after the fit had finished ("terminate called without an active exception").
Each rank writes what it saw to a JSON file.
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
    from pl_optim.callbacks import LRRangeTest, OneCycle

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    # 256 samples / 16 a batch / 2 ranks = 8 batches a rank an epoch; accumulation 2 -> 4 steps
    callbacks = [LRRangeTest(num_steps=20, plot_path=False), OneCycle("find")]
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=callbacks, default_root_dir=str(out),
                         **DDP_TRAINER_KWARGS)
    trainer.fit(TinyClassifier(optimizer="sgd"), datamodule=RandomClassificationData())
    cb = callbacks[1]
    group = trainer.optimizers[0].param_groups[0]
    state = {"totals": cb.totals, "steps": cb.steps, "lr": group["lr"], "momentum": group["momentum"],
             "max_lr": cb.resolved_max_lr}
    write_rank(out, trainer.global_rank, state)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_total_is_per_rank(tmp_path):
    from pl_optim.schedules import one_cycle

    run_ddp_script(__file__, tmp_path)
    r0, r1 = read_ranks(tmp_path)
    assert r0 == r1
    assert r0["totals"] == [8] and r0["steps"] == [8]
    assert len(r0["max_lr"]) == 1 and r0["max_lr"][0] > 0
    lr, mom = one_cycle(r0["max_lr"][0])
    assert (r0["lr"], r0["momentum"]) == (lr(7, 8), mom(7, 8))  # the last position's values


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
    end_ddp()
