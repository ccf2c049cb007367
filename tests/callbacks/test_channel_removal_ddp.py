"""Channel removal under strategy='ddp' (2 CPU processes, gloo): both ranks remove the same
channels at the same step, the DDP wrapper is rebuilt for the new shapes, training continues,
and the parameters end identical on both ranks.

The Trainer runs in a child script (this file run as ``__main__``) because Lightning's ddp
launcher re-executes the command line for rank 1; each rank saves its results to a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import DDP_TRAINER_KWARGS, run_ddp_script


def _run(out: Path) -> None:
    import lightning.pytorch as pl

    from examples.tiny import RandomClassificationData, TinyConvNet
    from pl_optim.callbacks import SelfCompression

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = TinyConvNet(optimizer="adam", lr=0.05)
    callback = SelfCompression(40.0, init_bits=2, lr=0.3, remove_channels=True, shift_decay=0.05)
    trainer = pl.Trainer(max_steps=30, callbacks=[callback], default_root_dir=str(out), **DDP_TRAINER_KWARGS)
    trainer.fit(model, datamodule=RandomClassificationData(n=160, shape=(1, 8, 8), batch_size=8))
    ddp_shapes = [tuple(p.shape) for p in trainer.strategy.model.parameters()]
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "events": callback.removal.events,
            "steps": trainer.global_step,
            "ddp_shapes": ddp_shapes,
            "shapes": [tuple(p.shape) for p in model.parameters()],
        },
        out / f"rank{trainer.global_rank}.pt",
    )


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_remove_the_same_channels(tmp_path):
    run_ddp_script(__file__, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["events"] and r0["events"] == r1["events"]
    assert r0["events"][0][0] < r0["steps"] == 30  # training went on after the first removal
    assert r0["ddp_shapes"] == r0["shapes"]  # the rebuilt wrapper holds the shrunk parameters
    assert r0["state"]["net.0.0.parametrizations.weight.original"].shape[0] < 8
    assert set(r0["state"]) == set(r1["state"])
    for key in r0["state"]:  # BN running stats are per rank between DDP's buffer broadcasts
        if "running_" in key or "num_batches" in key:
            continue
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0, msg=key)


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
