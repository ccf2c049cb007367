"""The W&B comparison runner: one offline run per variant and seed, and a summary table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from examples.compare import main, parse_variant, summarise

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_logs_offline_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    quick = "--trainer.max_epochs=1 --trainer.limit_train_batches=4"
    variants = main([
        "--config", str(ROOT / "examples/configs/digits_convnet.yaml"),
        "--seeds", "0", "1",
        "--save-dir", str(tmp_path / "runs"),
        "--variant", f"adam={quick}",
        "--variant", f"sgd={quick} --model.init_args.optimizer=sgd --model.init_args.lr=0.05",
    ])
    assert [v.name for v in variants] == ["adam", "sgd"]
    assert all(len(v.results) == 2 and 0.0 <= v.results[0]["val_acc"] <= 1.0 for v in variants)
    # different optimizers => different results
    assert variants[0].results[0]["val_loss"] != variants[1].results[0]["val_loss"]
    runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 4 and all(list(r.glob("*.wandb")) for r in runs)
    table = capsys.readouterr().out
    assert "variant" in table and "adam" in table and "sgd" in table and "±" in table


def test_parse_variant_and_errors():
    v = parse_variant("sgd=--model.init_args.optimizer=sgd --model.init_args.lr=0.05")
    assert v.name == "sgd" and v.args == ["--model.init_args.optimizer=sgd", "--model.init_args.lr=0.05"]
    assert parse_variant("plain=").args == []
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=ARGS"):
        parse_variant("no equals sign")


def test_summarise_mean_std():
    v = parse_variant("a=")
    v.results = [{"val_acc": 0.5}, {"val_acc": 0.7}]
    assert "0.6000 ± 0.1414" in summarise([v], ["val_acc"])


def test_compare_bad_config(tmp_path):
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "missing.yaml"), "--variant", "a="])
