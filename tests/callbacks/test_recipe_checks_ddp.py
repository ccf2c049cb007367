"""RecipeChecks under DDP (2 CPU processes, gloo): every rank runs the checks, gets the same
statuses, and the checks (which restore the model and optimizer) leave the ranks in sync.

The Trainer runs in a child script (this file run as ``__main__``, ``strategy="ddp"``) that
destroys the process group before it exits (see ``tests.helpers.end_ddp``). Each rank writes
what it saw to a JSON file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import DDP_TRAINER_KWARGS, end_ddp, read_ranks, run_ddp_script, write_rank


def _run(out: Path) -> None:
    import lightning.pytorch as pl
    import torch

    from examples.tiny import RandomClassificationData, TinyConvNet
    from pl_optim.callbacks import RecipeChecks

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    cb = RecipeChecks(checks=["init_loss", "overfit_batch", "batch_independence"],
                      options={"overfit_batch": {"steps": 60}})
    trainer = pl.Trainer(max_steps=3, callbacks=[cb], default_root_dir=str(out), **DDP_TRAINER_KWARGS)
    model = TinyConvNet(num_classes=3)
    trainer.fit(model, datamodule=RandomClassificationData(shape=(1, 8, 8), batch_size=64))
    state = {"statuses": [r.status for r in cb.report.results], "zero": trainer.is_global_zero,
             "weight_sum": float(sum(p.double().sum() for p in model.parameters()))}
    write_rank(out, trainer.global_rank, state)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_every_rank_checks_and_training_stays_in_sync(tmp_path):
    run_ddp_script(__file__, tmp_path)
    r0, r1 = read_ranks(tmp_path)
    assert r0["zero"] and not r1["zero"]
    assert r0["statuses"] == r1["statuses"] == ["pass", "pass", "pass"]
    assert r0["weight_sum"] == r1["weight_sum"]  # the checks did not desynchronise the ranks


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
    end_ddp()
