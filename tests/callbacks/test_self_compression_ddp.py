"""SelfCompression under strategy='ddp' (2 CPU processes, gloo), with and without channel removal.

* quantise only: both ranks end with identical bits, exponents and weights, and the size
  gradient was applied;
* remove channels (also with the column cost): both ranks remove the same channels at the same step, the
  DDP wrapper is rebuilt for the new shapes, training continues, and the parameters end identical.

The Trainer runs in a child script (this file run as ``__main__``, see
:func:`tests.helpers.run_ddp_script`); each rank saves what it saw to a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import DDP_TRAINER_KWARGS, end_ddp, run_ddp_script


def _run(out: Path, mode: str) -> None:
    import lightning.pytorch as pl

    from examples.tiny import RandomClassificationData, TinyConvNet
    from pl_optim.callbacks import SelfCompression

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    if mode.startswith("remove"):
        if mode == "remove":
            model = TinyConvNet(optimizer="adam", lr=0.05)
            callback = SelfCompression(40.0, init_bits=2, lr=0.3, remove_channels=True, shift_decay=0.05,
                                       compute_gamma=10.0)
        else:  # the column cost reads each rank's traced graph: the ranks must still agree
            model = TinyConvNet(optimizer="sgd", lr=0.05)
            callback = SelfCompression(0.8, init_bits=2, lr=0.2, remove_channels=True, shift_decay=0.05,
                                       compute_gamma=0.2, column_cost=2.0)
        limits, data = dict(max_steps=30), RandomClassificationData(n=160, shape=(1, 8, 8), batch_size=8)
    else:
        model = TinyConvNet(optimizer="sgd", lr=0.1)
        callback = SelfCompression(50.0, lr=0.2, remove_channels=False)
        limits, data = dict(max_epochs=1, limit_train_batches=4), RandomClassificationData(n=64, shape=(1, 8, 8), batch_size=8)
    trainer = pl.Trainer(callbacks=[callback], default_root_dir=str(out), **limits, **DDP_TRAINER_KWARGS)
    trainer.fit(model, datamodule=data)  # different data per rank comes from the DistributedSampler
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "events": callback.removal.core.events if mode.startswith("remove") else [],
            "steps": trainer.global_step,
            "ddp_shapes": [tuple(p.shape) for p in trainer.strategy.model.parameters()],
            "shapes": [tuple(p.shape) for p in model.parameters()],
        },
        out / f"rank{trainer.global_rank}.pt",
    )


def _ranks(tmp_path: Path, mode: str) -> tuple[dict, dict]:
    run_ddp_script(__file__, tmp_path, mode)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert set(r0["state"]) == set(r1["state"])
    for key in r0["state"]:  # parameters (weights, bits, exponents); BN running stats are per rank
        if "running_" in key or "num_batches" in key:
            continue
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0, msg=key)
    return r0, r1


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_agree(tmp_path):
    r0, _ = _ranks(tmp_path, "quantise")
    assert any(k.endswith(".bits") for k in r0["state"])
    assert (r0["state"]["net.1.0.parametrizations.weight.0.bits"] < 8.0).all()  # the size gradient acted


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("mode", ["remove", "remove-column"])
def test_ddp_ranks_remove_the_same_channels(tmp_path, mode):
    r0, r1 = _ranks(tmp_path, mode)
    assert r0["events"] and r0["events"] == r1["events"]
    assert r0["events"][0][0] < r0["steps"] == 30  # training went on after the first removal
    assert r0["ddp_shapes"] == r0["shapes"]  # the rebuilt wrapper holds the shrunk parameters
    assert r0["state"]["net.0.0.parametrizations.weight.original"].shape[0] < 8


if __name__ == "__main__":
    _run(Path(sys.argv[1]), sys.argv[2])
    end_ddp()
