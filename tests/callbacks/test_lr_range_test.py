"""LRRangeTest callback: sweeps on the real model/optimizer/data, leaves training untouched,
feeds OneCycle(max_lr="find"), saves a PNG, does not re-run on resume."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch

from examples.tiny import TinyClassifier
from pl_optim.callbacks import LRRangeTest, OneCycle
from pl_optim.schedules import one_cycle
from tests.callbacks.test_one_cycle import Probe, StopAfterEpoch, fit
from tests.callbacks.test_param_scheduler import ManualTwoOptimizers, TwoGroups


def test_training_after_the_sweep_equals_training_without_it(trainer_kwargs):
    _, plain = fit([], trainer_kwargs, TinyClassifier(optimizer="adam"), max_steps=6)
    pl.seed_everything(0)
    finder = LRRangeTest(num_steps=20, plot_path=False)
    trainer, swept = fit([finder], trainer_kwargs, TinyClassifier(optimizer="adam"), max_steps=6)
    assert len(finder.result.lrs) >= 3
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), swept.parameters()))
    assert trainer.global_step == 6


def test_one_cycle_find_uses_the_suggestion_per_group(trainer_kwargs):
    probe, finder = Probe(), LRRangeTest(num_steps=30, min_lr=1e-5, max_lr=1.0, plot_path="plots/lr.png")
    trainer, _ = fit([finder, OneCycle("find"), probe], trainer_kwargs, TwoGroups(), max_steps=5)
    s0, s1 = finder.suggested
    assert s1 == pytest.approx(s0)  # both groups start at lr=1e-3: ratio 1
    assert s0 == pytest.approx(finder.result.suggestion("min_div_10"))
    (lr0, m0), (lr1, m1) = one_cycle(s0), one_cycle(s1)
    assert probe.trace == [(0, lr0(k, 5), m0(k, 5), lr1(k, 5), m1(k, 5)) for k in range(5)]
    png = trainer.default_root_dir + "/plots/lr.png"
    assert finder.saved_plot is not None and str(finder.saved_plot) == png
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_find_works_whatever_the_callback_order(trainer_kwargs):
    finder = LRRangeTest(num_steps=10, plot_path=False)
    cb = OneCycle("find")
    fit([cb, finder], trainer_kwargs, max_steps=3)
    assert cb.resolved_max_lr == finder.suggested and len(finder.result.lrs) <= 10


def test_resume_does_not_sweep_again(trainer_kwargs, tmp_path):
    kw = dict(limit_train_batches=3, max_epochs=4)
    full_probe = Probe()
    fit([LRRangeTest(num_steps=10, plot_path=False), OneCycle("find"), full_probe], trainer_kwargs, **kw)
    pl.seed_everything(0)
    p1 = Probe()
    t1, _ = fit([LRRangeTest(num_steps=10, plot_path=False), OneCycle("find"), p1, StopAfterEpoch(1)], trainer_kwargs, **kw)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    finder, p2 = LRRangeTest(num_steps=10, plot_path=False), Probe()
    fit([finder, OneCycle("find"), p2], trainer_kwargs, ckpt_path=str(tmp_path / "half.ckpt"), **kw)
    assert finder.result is None  # restored, not re-run
    assert p1.trace + p2.trace == full_probe.trace


def test_manual_optimization_is_refused(trainer_kwargs):
    with pytest.raises(ValueError, match="LRRangeTest supports automatic optimization only"):
        fit([LRRangeTest(plot_path=False)], trainer_kwargs, ManualTwoOptimizers(), max_steps=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"min_lr": -1.0}, r"`min_lr` must be a positive finite number, got -1.0"),
        ({"max_lr": 1e-9}, r"`max_lr` must be > `min_lr` \(1e-07\), got 1e-09"),
        ({"num_steps": 1}, r"`num_steps` must be an integer >= 3, got 1"),
        ({"suggestion": "valley"}, r"`suggestion` must be one of \('min_div_10', 'steepest'\), got 'valley'"),
        ({"optimizers": -1}, r"`optimizers` must be an integer >= 0, got -1"),
        ({"plot_path": 3}, r"`plot_path` must be None \(default file\), False \(no plot\) or a file path, got 3"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRRangeTest(**kwargs)


def test_warns_when_the_suggestion_sits_below_min_lr(trainer_kwargs, recwarn):
    # diverges from the first step: the lowest loss is the first point, min/10 is below min_lr
    finder = LRRangeTest(min_lr=1.0, max_lr=1e6, num_steps=10, plot_path=False)
    fit([finder], trainer_kwargs, max_steps=1)
    messages = [str(w.message) for w in recwarn if "LRRangeTest:" in str(w.message)]
    assert finder.suggested[0] < 1.0
    assert len(messages) == 1, messages
    assert re.search(r"LRRangeTest: the suggested lr 0.1 \(min_div_10\) sits at or below the start of the sweep "
                     r"\(`min_lr`=1\).*Lower `min_lr`, or raise `num_steps`", messages[0]), messages[0]


def test_no_warning_for_a_healthy_sweep(trainer_kwargs, recwarn):
    finder = LRRangeTest(num_steps=60, min_lr=1e-4, max_lr=1e3, plot_path=False)
    fit([finder], trainer_kwargs, TinyClassifier(optimizer="sgd", lr=0.01), max_steps=1)
    assert finder.result.diverged
    assert [str(w.message) for w in recwarn if "LRRangeTest:" in str(w.message)] == []


def test_report_is_a_table_of_the_sweep(trainer_kwargs):
    finder = LRRangeTest(num_steps=12, plot_path=False)
    assert finder.report is None
    fit([finder], trainer_kwargs, max_steps=1)
    rows = finder.report.to_dicts()
    assert [r["lr"] for r in rows] == finder.result.lrs and [r["loss"] for r in rows] == finder.result.losses
    assert str(finder.report).startswith(f"LR range test: {len(rows)} steps")


def test_the_sweep_leaves_no_trace_in_the_epoch_metrics(trainer_kwargs):
    """training_step updates torchmetrics during the sweep too: they are reset, so the epoch's
    accuracy equals the run without the sweep (without the reset it counts the sweep's batches)."""
    kw = dict(max_epochs=1, limit_train_batches=4)
    plain_trainer, _ = fit([], trainer_kwargs, TinyClassifier(optimizer="adam"), **kw)
    pl.seed_everything(0)
    finder = LRRangeTest(num_steps=20, plot_path=False)
    swept_trainer, swept = fit([finder], trainer_kwargs, TinyClassifier(optimizer="adam"), **kw)
    plain, after = plain_trainer.callback_metrics, swept_trainer.callback_metrics
    assert set(plain) == set(after) and "train_acc" in plain
    for name in plain:
        assert torch.equal(plain[name], after[name]), name
