"""SelfCompression under strategy='ddp' (2 CPU processes, gloo): both ranks end with identical
bits, exponents and weights, and the size gradient was applied.

The Trainer runs in a child script (this file run as ``__main__``) because Lightning's ddp
launcher re-executes the command line for rank 1; each rank saves its parameters to a file.
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
    model = TinyConvNet(optimizer="sgd", lr=0.1)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=4, callbacks=[SelfCompression(50.0, lr=0.2)], default_root_dir=str(out),
        **DDP_TRAINER_KWARGS,
    )
    # different data per rank comes from the DistributedSampler
    trainer.fit(model, datamodule=RandomClassificationData(n=64, shape=(1, 8, 8), batch_size=8))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_agree(tmp_path):
    run_ddp_script(__file__, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert set(r0) == set(r1) and any(k.endswith(".bits") for k in r0)
    for key in r0:  # parameters (weights, bits, exponents); BN running stats are per-rank between broadcasts
        if "running_" in key or "num_batches" in key:
            continue
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
    assert (r0["net.1.0.parametrizations.weight.0.bits"] < 8.0).all()  # the size gradient acted


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
