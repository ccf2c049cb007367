"""examples/configs/digits_one_cycle.yaml: OneCycle added to the demo through LightningCLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from examples.cli import main
from pl_optim.callbacks import OneCycle
from pl_optim.schedules import one_cycle

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/digits_one_cycle.yaml"


@pytest.mark.slow
def test_yaml_runs_one_epoch_through_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "examples.cli", "fit", "--config", CONFIG, "--trainer.max_epochs=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 epochs, 23 optimizer steps" in out.stdout and "val_acc" in out.stdout


def test_yaml_attaches_one_cycle_with_the_derived_length(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", CONFIG, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
                "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, OneCycle))
    assert cb.totals == [6] and cb.steps == [6]
    group = cli.trainer.optimizers[0].param_groups[0]
    lr, mom = one_cycle(0.01, pct_start=0.25)
    assert (group["lr"], group["betas"]) == (lr(5, 6), (mom(5, 6), 0.99))


def test_bad_max_lr_is_one_line_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--trainer.callbacks.init_args.max_lr=-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`max_lr` must be > 0, got -1.0" in err and "Traceback" not in err
