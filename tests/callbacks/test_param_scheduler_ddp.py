"""OneCycle under DDP (2 CPU processes, gloo, ``strategy="ddp_spawn"`` so the test runs in
process): the derived total is per rank (the DistributedSampler halves the batches), both ranks
end at the same position and values, and ``max_lr="find"`` gives both ranks rank 0's LR range
test suggestion. Each rank writes what it saw to a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim.callbacks import LRRangeTest, OneCycle
from pl_optim.schedules import one_cycle


class Report(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, OneCycle))
        group = trainer.optimizers[0].param_groups[0]
        state = {"totals": cb.totals, "steps": cb.steps, "lr": group["lr"], "momentum": group["momentum"],
                 "max_lr": cb.resolved_max_lr}
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_total_is_per_rank(trainer_kwargs, tmp_path):
    # 256 samples / 16 a batch / 2 ranks = 8 batches a rank an epoch; accumulation 2 -> 4 steps
    kw = {**trainer_kwargs, "devices": 2, "strategy": "ddp_spawn", "limit_val_batches": 0}
    callbacks = [LRRangeTest(num_steps=20, plot_path=False), OneCycle("find"), Report(str(tmp_path))]
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=callbacks, **kw)
    trainer.fit(TinyClassifier(optimizer="sgd"), datamodule=RandomClassificationData())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["totals"] == [8] and r0["steps"] == [8]
    assert len(r0["max_lr"]) == 1 and r0["max_lr"][0] > 0
    lr, mom = one_cycle(r0["max_lr"][0])
    assert (r0["lr"], r0["momentum"]) == (lr(7, 8), mom(7, 8))  # the last position's values
