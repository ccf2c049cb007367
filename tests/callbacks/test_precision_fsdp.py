"""Optimizer-level callbacks (OneCycle, ParamScheduler, AMSGradToggle) under strategy='fsdp'.

Lightning's FSDPStrategy refuses ``accelerator='cpu'`` ("The strategy `fsdp` requires a GPU
accelerator"), so this runs only on a machine with 2 CUDA devices (``scripts/gpu_check.sh``); it is
skipped with that reason elsewhere. FSDP brings its own precision plugin (``FSDPPrecision``), so the
pl_optim precision plugins are not used here. DecoupledWeightDecay and SelfCompression refuse
sharded strategies by design.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import end_ddp, read_ranks, run_ddp_script, write_rank


def _run(out: Path) -> None:
    import lightning.pytorch as pl

    from examples.tiny import RandomClassificationData, TinyClassifier
    from pl_optim.callbacks import AMSGradToggle, OneCycle

    pl.seed_everything(0, verbose=False)
    cycle, toggle = OneCycle(max_lr=0.02), AMSGradToggle({1: True})
    trainer = pl.Trainer(accelerator="cuda", devices=2, strategy="fsdp", precision="bf16-mixed", max_epochs=2,
                         callbacks=[cycle, toggle], logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=str(out))
    trainer.fit(TinyClassifier(optimizer="adam"), datamodule=RandomClassificationData())
    group = trainer.optimizers[0].param_groups[0]
    state = {"positions": cycle.step_positions(), "global_step": trainer.global_step, "lr": group["lr"],
             "amsgrad": group["amsgrad"]}
    write_rank(out, trainer.global_rank, state)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="Lightning's FSDPStrategy needs CUDA (refuses accelerator='cpu'); needs 2 GPUs: scripts/gpu_check.sh")
def test_optimizer_level_callbacks_under_fsdp(tmp_path):
    run_ddp_script(__file__, tmp_path)
    r0, r1 = read_ranks(tmp_path)
    assert r0 == r1
    assert r0["positions"] == [r0["global_step"]] and r0["amsgrad"] is True
    assert r0["lr"] == pytest.approx(0.02 / 25 / 1e4, rel=1e-3)  # 1cycle ended at max_lr / (div * final_div)


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
    end_ddp()
