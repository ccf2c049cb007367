"""The super-convergence benchmark's harder digits task and its epochs-to-target arithmetic."""

from __future__ import annotations

import pytest
import torch

from examples.benchmarks.bench_super_convergence import HardDigitsDataModule, build_study, summarise
from examples.data import DigitsDataModule


def test_hard_digits_subset_noise_shift_and_clean_validation():
    clean, hard = DigitsDataModule(seed=0), HardDigitsDataModule(train_size=400, label_noise=0.2, shift=1, seed=0)
    clean.setup(), hard.setup()
    assert len(hard.train_set) == 400
    torch.testing.assert_close(hard.val_set.tensors[0], clean.val_set.tensors[0])  # validation untouched
    torch.testing.assert_close(hard.val_set.tensors[1], clean.val_set.tensors[1])
    # the kept images are training images; 20% ± sampling noise of their labels were changed
    x_clean, y_clean = clean.train_set.tensors
    index = {tuple(img.flatten().tolist()): int(y) for img, y in zip(x_clean, y_clean)}
    changed = sum(index[tuple(img.flatten().tolist())] != int(y) for img, y in zip(hard.train_set.x, hard.train_set.y))
    assert 0.15 * 400 < changed < 0.25 * 400
    # shifts: same shape, some draws differ from the stored image, background fill only
    torch.manual_seed(0)
    draws = [hard.train_set[0][0] for _ in range(20)]
    assert all(d.shape == (1, 8, 8) for d in draws)
    assert any(not torch.equal(d, hard.train_set.x[0]) for d in draws)
    assert HardDigitsDataModule(shift=0, seed=0).train_set is None  # lazy until setup


@pytest.mark.parametrize("kwargs, match", [({"label_noise": 1.0}, "label_noise"), ({"train_size": 0}, "train_size"),
                                           ({"shift": -1}, "shift")])
def test_hard_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        HardDigitsDataModule(**kwargs)


def test_ratio_uses_first_epoch_for_constant_and_smallest_budget_for_1cycle():
    study = build_study("digits", max_epochs=6, budgets=[2, 4], tuned_lr=3e-3, target=0.9, cifar_dir=None)

    def rec(variant, seed, accs):
        return {"variant": variant, "seed": seed, "final": {"val_acc": accs[-1]},
                "history": [{"epoch": i + 1, "val_acc": a} for i, a in enumerate(accs)]}

    records = [
        rec("adam_3e-4", 0, [0.5, 0.7, 0.8, 0.85, 0.91, 0.95]),    # first reaches at epoch 5
        rec("adam_0.003", 0, [0.8, 0.92, 0.95, 0.95, 0.95, 0.96]),
        rec("one_cycle_e2", 0, [0.85, 0.89]),                     # budget 2 ends below target
        rec("one_cycle_e4", 0, [0.7, 0.93, 0.8, 0.92]),           # budget 4 ends above it -> 4
        rec("adam_3e-4", 1, [0.5] * 6),                           # never reaches
        rec("adam_0.003", 1, [0.95] * 6),
        rec("one_cycle_e2", 1, [0.9, 0.95]),
        rec("one_cycle_e4", 1, [0.9] * 4),
    ]
    text = summarise(study, records, [0, 1], [2, 4], 6, "adam_0.003")
    assert "per seed [1.25]" in text and "seed 1: > 6/2" in text
    assert "1cycle + wd (smallest budget)            3 [2–4]" in text
