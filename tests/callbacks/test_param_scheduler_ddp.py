"""OneCycle under strategy='ddp' (2 CPU processes, gloo): the derived total is per rank (the
DistributedSampler halves the batches) and both ranks end at the same position and values.

The Trainer runs in a child script (this file run as ``__main__``) because Lightning's ddp
launcher re-executes the command line for rank 1; each rank writes what it saw to a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path) -> None:
    import lightning.pytorch as pl
    import torch

    from examples.tiny import RandomClassificationData, TinyClassifier
    from pl_optim.callbacks import OneCycle

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    cb = OneCycle(0.1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, accumulate_grad_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[cb], default_root_dir=str(out),
    )
    # 256 samples / 16 a batch / 2 ranks = 8 batches a rank an epoch; accumulation 2 -> 4 steps
    trainer.fit(TinyClassifier(optimizer="sgd"), datamodule=RandomClassificationData())
    group = trainer.optimizers[0].param_groups[0]
    state = {"totals": cb.totals, "steps": cb.steps, "lr": group["lr"], "momentum": group["momentum"]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_total_is_per_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from pl_optim.schedules import one_cycle

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["totals"] == [8] and r0["steps"] == [8]
    lr, mom = one_cycle(0.1)
    assert (r0["lr"], r0["momentum"]) == (lr(7, 8), mom(7, 8))  # held at the last position


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
