"""Test helpers shared by tests/core and tests/callbacks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision


def fp16_cpu_plugin() -> MixedPrecision:
    """fp16 autocast + a real ``torch.amp.GradScaler("cpu")`` on CPU (Lightning's
    ``precision="16-mixed"`` needs CUDA; this exercises the same loss-scaling code path)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


class InjectInfGrad(Callback):
    """Make the gradients inf at the given batch indices (global batch counter), so that a
    GradScaler skips those optimizer steps."""

    def __init__(self, batches: Iterable[int]) -> None:
        self.batches = set(batches)
        self.seen = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.seen in self.batches:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
        self.seen += 1


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

#: Trainer settings of the 2-process CPU DDP tests (quiet, no validation, no files but the output).
DDP_TRAINER_KWARGS = dict(
    accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
)


def end_ddp() -> None:
    """The last call of a DDP child script's ``__main__``: destroy the process group before the interpreter
    exits. Left to interpreter shutdown, gloo's threads were torn down in the wrong order once in a CI run
    (the fit had finished, then "terminate called without an active exception" aborted the rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_ddp_script(script: str, out_dir, *args: str) -> None:
    """Run ``script`` (a test file whose ``__main__`` trains with ``strategy="ddp"``) in a child
    process with ``out_dir`` (and ``args``) as its arguments and fail with its stderr if it fails.

    A child process is needed because Lightning's ddp launcher re-executes the command line for
    rank 1; each rank writes what it saw into ``out_dir`` for the test to compare."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, script, str(out_dir), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def write_rank(out, rank: int, state: dict, name: str = "") -> None:
    """In a DDP child script: save what rank ``rank`` saw (JSON) for :func:`read_ranks`."""
    import json
    from pathlib import Path

    (Path(out) / f"{name}rank{rank}.json").write_text(json.dumps(state))


def read_ranks(out, name: str = "") -> tuple[dict, dict]:
    """In the test: what ranks 0 and 1 saved with :func:`write_rank`."""
    import json
    from pathlib import Path

    return tuple(json.loads((Path(out) / f"{name}rank{r}.json").read_text()) for r in (0, 1))
