"""Shared fixtures. Tiny modules live in :mod:`examples.tiny` (copyable) and are re-exported here."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny models gain nothing from intra-op threads; one thread keeps runs deterministic and lets
# the 2-process DDP tests share the 2 cores.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# torchvision tests need their own venv (.venv-vision, `make test-vision`): never collected here.
collect_ignore = ["vision"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)


@pytest.fixture
def trainer_kwargs(tmp_path) -> dict:
    """Quiet, CPU-only Trainer settings for callback tests (merge your own on top)."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
