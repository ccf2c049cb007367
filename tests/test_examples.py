"""Foundation: example data/models train through Trainer, bad arguments fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from examples.data import CIFAR10DataModule, DigitsDataModule
from examples.models import DigitsConvNet, ResNet9
from examples.tiny import RandomClassificationData, TinyClassifier, TinyConvNet

ROOT = Path(__file__).resolve().parents[1]


def test_digits_split_is_deterministic_and_disjoint():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup(), b.setup()
    assert len(a.train_set) + len(a.val_set) == 1797
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert a.train_set.tensors[0].shape[1:] == (1, 8, 8)
    c = DigitsDataModule(seed=4)
    c.setup()
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])


def test_digits_convnet_learns(trainer_kwargs):
    model = DigitsConvNet(lr=3e-3)
    trainer = pl.Trainer(max_epochs=3, **trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.callback_metrics["val_acc"] > 0.9


@pytest.mark.parametrize("in_channels,size", [(1, 8), (3, 32)])
def test_resnet9_shapes(in_channels, size):
    model = ResNet9(widths=(8, 8, 16, 16), in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


def test_resnet9_trains_on_digits(trainer_kwargs):
    model = ResNet9(widths=(16, 16, 32, 32), in_channels=1, lr=3e-3)
    trainer = pl.Trainer(max_epochs=2, **trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.callback_metrics["val_acc"] > 0.8


@pytest.mark.parametrize("module", [TinyClassifier, TinyConvNet])
def test_tiny_modules_fit(module, trainer_kwargs):
    shape = (8,) if module is TinyClassifier else (1, 8, 8)
    model = module(lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    pl.Trainer(max_steps=5, **trainer_kwargs).fit(model, datamodule=RandomClassificationData(shape=shape))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: DigitsConvNet(optimizer="lamb"), "`optimizer` must be one of"),
        (lambda: DigitsConvNet(lr=0), "`lr` must be a positive"),
        (lambda: DigitsConvNet(momentum=1.0), "`momentum` must be in"),
        (lambda: DigitsConvNet(channels=(8, 0, 8)), r"`channels` must be 3 positive integers, got \(8, 0, 8\)"),
        (lambda: ResNet9(widths=(8, 8)), "`widths` must be 4"),
        (lambda: DigitsDataModule(batch_size=0), "`batch_size` must be a positive integer, got 0"),
        (lambda: DigitsDataModule(val_fraction=1.5), r"`val_fraction` must be in \(0, 1\), got 1.5"),
    ],
)
def test_bad_example_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not contain 'cifar-10-batches-py'"):
        CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))


def _cli(*args: str, config: str = "examples/configs/digits_convnet.yaml") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "examples.cli", "fit", "--config", config, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_demo_runs_and_reports():
    out = _cli("--trainer.max_epochs=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[demo] DigitsConvNet" in out.stdout and "val_acc" in out.stdout


@pytest.mark.slow
def test_cli_self_compression_demo_config_runs():
    """The second `make demo` run: OneCycle (per-group peaks) + decoupled decay + SelfCompression."""
    out = _cli("--trainer.max_epochs=2", config="examples/configs/digits_self_compression.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "self_compression/bits_pct" in out.stdout and "SelfCompression report" in out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "examples.models.Nope"], "examples.models.Nope"),
        (["--model.init_args.lr=-1"], "`lr` must be a positive finite number, got -1.0"),
        (["--data", "examples.data.CIFAR10DataModule", "--data.data_dir=/nonexistent"], "/nonexistent"),
        (["--trainer.max_epochs=abc"], "trainer.max_epochs"),
    ],
)
def test_cli_bad_arguments_one_line(args, needle):
    out = _cli(*args)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_channel_removal_benchmark_runs_end_to_end(tmp_path, capsys):
    """The benchmark script on a tiny ResNet-9 shape (2 epochs, a few timed reps): every figure is
    printed and returned, and --load re-times the saved nets. (Smoke test: the figures themselves come
    from the full run, see docs/channel_removal.md.)"""
    from examples.benchmarks.bench_channel_removal import main

    saved = tmp_path / "nets.pt"
    out = main(["--model", "resnet9", "--widths", "4", "8", "8", "8", "--epochs", "2", "--gamma", "1", "--compute-gamma", "1", "--reps", "3",
                "--steps", "2", "--batches", "1", "2", "--save", str(saved)])
    text = capsys.readouterr().out
    for needle in ("weights kept", "epoch wall time last/first", "training step, interleaved", "per-stage median",
                   "simplify_for_inference on both nets", "MACs per sample"):
        assert needle in text
    assert set(out["latency"]) == {"plain", "simplified"} and set(out["latency"]["plain"]) == {1, 2}
    assert all(v > 0 for r in out["latency"].values() for v in r.values())
    assert 0 < out["weights_pct"] <= 100 and 0 < out["bits_pct"] <= 100
    capsys.readouterr()
    again = main(["--load", str(saved), "--reps", "3", "--batches", "1"])
    text = capsys.readouterr().out
    assert "accuracy: float" in text and "predictions differ from the float net's" in text
    assert set(again["latency"]["simplified"]) == {1}


def test_channel_removal_benchmark_distills_from_the_float_run(monkeypatch, capsys):
    """--distill: every training step of the compressed run mixes in the float baseline's soft targets
    (the teacher is the float run's net, never the student) at --distill-alpha's weight; --warm-start: the
    compressed run starts from the float run's trained weights; each refused where it cannot apply."""
    from examples.benchmarks import _distill
    from examples.benchmarks import bench_channel_removal as bench

    teachers, alphas, at_setup = [], [], []
    original, original_setup = _distill.distill_loss, bench.SelfCompression.setup

    def counted(loss, logits, x, teacher, alpha):
        teachers.append(teacher)
        alphas.append(alpha)
        return original(loss, logits, x, teacher, alpha)

    def setup(self, trainer, pl_module, stage):
        at_setup.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})
        return original_setup(self, trainer, pl_module, stage)

    monkeypatch.setattr(_distill, "distill_loss", counted)
    monkeypatch.setattr(bench.SelfCompression, "setup", setup)
    args = ["--widths", "4", "8", "8", "8", "--epochs", "1", "--reps", "2", "--steps", "1", "--batches", "1", "--distill"]
    out = bench.main(args)
    assert "distilled from the float run (a=0.5" in capsys.readouterr().out
    assert len(teachers) == 23 and len({id(t) for t in teachers}) == 1  # 1,437 images / 64 per batch
    assert set(alphas) == {0.5}
    assert not any("parametrizations" in n for n, _ in teachers[0].named_modules())
    assert 0 < out["weights_pct"] <= 100
    float_weights = {k: v.clone() for k, v in teachers[0].teacher.state_dict().items()}
    assert not torch.equal(at_setup[0]["0.0.weight"], float_weights["0.0.weight"])  # cold start: the seed's init

    for seen in (teachers, alphas, at_setup):
        seen.clear()
    bench.main([*args, "--distill-alpha", "0.9", "--warm-start"])
    text = capsys.readouterr().out
    assert "distilled from the float run (a=0.9" in text and "warm-started from the float run" in text
    assert set(alphas) == {0.9} and "predictions differ from the float net's" in text
    teacher_weights = teachers[0].teacher.state_dict()
    assert at_setup[0].keys() == teacher_weights.keys()
    assert all(torch.equal(at_setup[0][k], teacher_weights[k]) for k in teacher_weights)

    for bad, needle in ((["--model", "digits", "--distill", "--epochs", "1"], "--distill: only with --model resnet9"),
                        (["--distill", "--distill-alpha", "1.5"], "--distill-alpha: must be in (0, 1], got 1.5"),
                        (["--distill-alpha", "0.9"], "--distill-alpha: only with --distill"),
                        (["--distill-alpha", "0.5"], "--distill-alpha: only with --distill"),
                        (["--distill", "--distill-alpha", "0"], "--distill-alpha")):
        with pytest.raises(SystemExit):
            bench.main(bad)
        assert needle in capsys.readouterr().err


def test_precomputed_teacher_answers_known_rows_without_a_forward():
    """PrecomputedTeacher: the teacher's outputs on known rows (any order, any batch), no forward for them;
    unknown rows go through the teacher."""
    from examples.benchmarks._distill import PrecomputedTeacher

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    inputs = torch.randn(10, 1, 4, 4)
    teacher = PrecomputedTeacher(net, inputs, batch_size=4)
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    batch = inputs[[7, 2, 2, 9]]
    torch.testing.assert_close(teacher(batch), net(batch).detach())
    calls.clear()
    teacher(batch)
    assert not calls  # looked up, not computed
    new = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(teacher(new), net(new).detach())
    assert calls


def test_self_compression_benchmark_distills_warms_up_and_caches_the_float_run(tmp_path, capsys):
    """bench_self_compression end to end on 2 epochs (smoke test: the figures come from the full runs in
    docs/self_compression.md): the float run is cached and read back with the same accuracy; --distill,
    --gamma-warmup, --init-bits and --integer-bits reach the compressed run."""
    from examples.benchmarks import bench_self_compression as bench

    args = ["--arch", "digits", "--seeds", "3", "--epochs", "2", "--cache", str(tmp_path)]
    first = bench.main(args)
    assert "training the float model" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_seed3_epochs2.json", "digits_seed3_epochs2.pt"]
    cached = tmp_path / "digits_seed3_epochs2.json"
    cached.write_text(json.dumps({"acc": 0.5}))  # a value no training gives: the second run must read it
    seen = []
    original = bench.train

    def spy(arch, recipe, seed, epochs=bench.EPOCHS, teacher=None):
        seen.append((recipe, teacher))
        return original(arch, recipe, seed, epochs, teacher)

    bench.train = spy
    try:
        second = bench.main([*args, "--distill", "--gamma-warmup", "0.3", "--init-bits", "7", "--integer-bits"])
    finally:
        bench.train = original
    text = capsys.readouterr().out
    assert "float model read from" in text and "distilled from the float model" in text
    assert len(seen) == 1 and seen[0][0]["gamma_warmup"] == 0.3 and isinstance(seen[0][1], torch.nn.Module)
    assert seen[0][0]["init_bits"] == 7.0 and seen[0][0]["integer_bits"] is True
    assert first["digits"]["float"] != [0.5] and second["digits"]["float"] == [0.5]  # the cached float run, not a new one


def test_channel_removal_benchmark_label_smoothing_and_recalibration(monkeypatch, capsys):
    """--label-smoothing reaches the loss of both runs; --recalibrate re-estimates BatchNorm after each
    run and prints the accuracy with the running statistics next to it; bad values are refused."""
    import torch.nn.functional as F

    from examples.benchmarks import bench_channel_removal as bench

    smoothing = []
    original = F.cross_entropy

    def recorded(*args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing", 0.0))
        return original(*args, **kwargs)

    calls = []
    monkeypatch.setattr(bench.torch.nn.functional, "cross_entropy", recorded)
    monkeypatch.setattr(bench, "recalibrate_batchnorm", lambda net, inputs: calls.append(net) or 0)
    bench.main(["--widths", "4", "8", "8", "8", "--epochs", "1", "--reps", "2", "--steps", "1", "--batches", "1",
                "--label-smoothing", "0.1", "--recalibrate"])
    text = capsys.readouterr().out
    assert "label smoothing 0.1, BatchNorm recalibrated" in text and "before recalibration" in text
    assert smoothing.count(0.1) == 46  # 23 steps of each run
    assert len(calls) == 2 and calls[0] is not calls[1]
    with pytest.raises(SystemExit):
        bench.main(["--label-smoothing", "1", "--epochs", "1"])
    assert "--label-smoothing: must be in [0, 1), got 1.0" in capsys.readouterr().err
