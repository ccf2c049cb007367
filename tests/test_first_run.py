"""What a new user meets first (issue #16): the CLI's W&B default, benchmark ``--help`` and bad
arguments, where outputs go, and the figure checker behind ``make figures``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "examples" / "benchmarks").glob("bench_*.py"))
SCRIPTS = [f"examples.benchmarks.{b}" for b in BENCHMARKS] + ["examples.compress_digits"]


def _check_figures():
    spec = importlib.util.spec_from_file_location("check_figures", ROOT / "scripts" / "check_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- W&B ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_wandb_logger_runs_offline_without_any_setting(tmp_path):
    """`--trainer.logger=WandbLogger` with no WANDB_MODE and no API key: an offline run, exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_SILENT"] = "true"
    out = subprocess.run(
        [sys.executable, "-m", "examples.cli", "fit", "--config", "examples/configs/digits_convnet.yaml",
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.logger=WandbLogger",
         f"--trainer.logger.save_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "wandb").glob("offline-run-*")), list(tmp_path.rglob("*"))[:20]


@pytest.mark.parametrize("preset,expected", [(None, "offline"), ("disabled", "disabled"), ("online", "online")])
def test_cli_sets_wandb_offline_only_when_unset(monkeypatch, preset, expected):
    from examples import cli

    if preset is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", preset)
    with pytest.raises(SystemExit):  # a bad argument: stops before training
        cli.main(["fit", "--trainer.max_epochs=abc"])
    assert os.environ["WANDB_MODE"] == expected


# --- benchmarks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help_lists_every_default(script, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    options = set(re.findall(r"\[(--[\w-]+)", text.split("\n\n")[0])) - {"--help"}
    assert options, text
    described = re.findall(r"^\s+(--[\w-]+).*?\(default: [^)]*\)", re.sub(r"\n\s{20,}", " ", text), re.M)
    assert set(described) == options, f"without help/default: {options - set(described)}"


@pytest.mark.parametrize(
    "script,args,needle",
    [
        ("examples.benchmarks.bench_channel_removal", ["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
        ("examples.benchmarks.bench_channel_removal", ["--gamma", "-1"], "argument --gamma: must be a positive finite number, got -1.0"),
        ("examples.benchmarks.bench_channel_removal", ["--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
        ("examples.benchmarks.bench_channel_removal", ["--gamma-warmup", "0.8"],
         "argument --gamma-warmup: must be below --freeze-at (0.75) and 1, got 0.8"),
        ("examples.benchmarks.bench_one_cycle", ["--reps", "two"], "argument --reps: expected int, got 'two'"),
        ("examples.benchmarks.bench_one_cycle", ["--warmup", "-3"], "argument --warmup: must be an integer >= 0, got -3"),
        ("examples.benchmarks.bench_self_compression", ["--seeds"], "argument --seeds: expected at least one argument"),
        ("examples.benchmarks.bench_self_compression", ["--gamma-warmup", "1"], "argument --gamma-warmup: must be in (0, 1)"),
        pytest.param("examples.benchmarks.bench_self_compression", ["--arch", "tv_resnet18"],
                     "--arch tv_resnet18 needs a torchvision that imports", id="tv_resnet18-without-torchvision",
                     marks=pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                              reason="torchvision is installed here")),
        ("examples.benchmarks.bench_weight_decay", ["--wd", "nan"], "argument --wd: must be a finite number >= 0, got nan"),
        ("examples.benchmarks.bench_weight_decay", ["--bogus"], "unrecognized arguments: --bogus"),
        ("examples.compress_digits", ["--gammas", "0.1", "0"], "argument --gammas: must be a positive finite number, got 0.0"),
    ],
)
def test_benchmark_bad_argument_is_one_line(script, args, needle, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_progress_line(capsys):
    from examples.benchmarks._cli import Progress

    Progress("bench_x")("training the float baseline")
    assert re.fullmatch(r"\[bench_x \+\d+s\] training the float baseline\n", capsys.readouterr().out)


# --- outputs --------------------------------------------------------------------------------------
def test_outputs_are_git_ignored_and_cleaned(capsys):
    assert "/outputs/" in (ROOT / ".gitignore").read_text().split()
    clean = re.search(r"^clean:\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert clean and "outputs" in clean.group(1).split()
    from examples.compress_digits import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "(default: outputs/compress_digits.png)" in " ".join(capsys.readouterr().out.split())


# --- make figures ---------------------------------------------------------------------------------
DEMO_OUTPUT = """\
Seed set to 0
[demo] DigitsConvNet: 29,574 parameters, 20 epochs, 460 optimizer steps in 33.7s
[demo]   self_compression/bits_pct = 3.1617
[demo]   self_compression/weights_pct = 47.9912
[demo]   val_acc = 0.9884
[demo]   channels net.1.0 = 64 -> 44
[demo]   channels net.3.0 = 64 -> 37
"""


def test_figure_checker_parses_the_demo_lines():
    values = _check_figures().parse_demo(DEMO_OUTPUT)
    assert values == {
        "model": "DigitsConvNet", "parameters": 29574, "epochs": 20, "steps": 460, "seconds": 33.7,
        "self_compression_bits_pct": 3.1617, "self_compression_weights_pct": 47.9912, "val_acc": 0.9884,
        "channels_net_1_0": "64 → 44", "channels_net_3_0": "64 → 37",
    }
    with pytest.raises(ValueError, match="run failed"):
        _check_figures().parse_demo("Traceback ...")


def test_figure_checker_finds_stale_text():
    cf = _check_figures()
    values = cf.parse_demo(DEMO_OUTPUT)
    templates = cf.FIGURES["digits_self_compression"][1]["README.md"]
    fresh = ("20 epochs, 460 optimizer steps: `val_acc = 0.9884` with 3.16% of the float bits\n   and 47.99% of the"
             " weights kept (channels 64 → 44 and 64 → 37 removed; 29,574 parameters left)")
    assert cf.mismatches(fresh, templates, values) == []
    stale = fresh.replace("0.9884", "0.9876").replace("64 → 44", "64 → 48")
    assert cf.mismatches(stale, templates, values) == [
        "20 epochs, 460 optimizer steps: `val_acc = 0.9884`", "channels 64 → 44 and 64 → 37"]


def test_every_figure_template_is_in_its_document_and_names_printed_values():
    """The documents still contain every sentence the checker looks for (filled from a fake run
    with the documents' own numbers would be circular; here: each template's fixed text is there)."""
    cf = _check_figures()
    for name, (command, documents) in cf.FIGURES.items():
        assert command[1:4] == ["-m", "examples.cli", "fit"], name
        for doc, templates in documents.items():
            body = cf.squash((ROOT / doc).read_text())
            for template in templates:
                for literal in re.split(r"\{[^}]*\}", template):
                    assert cf.squash(literal) in body, (name, doc, literal)


def test_figure_checker_reads_the_range_test_suggestion():
    values = _check_figures().parse_demo(
        "LRRangeTest: 100 steps up to lr 10; suggested lr per param group: [0.02009]\n"
        "[demo] DigitsConvNet: 58,474 parameters, 8 epochs, 184 optimizer steps in 4.7s\n[demo]   val_acc = 0.9871\n")
    assert values["suggested_lr"] == 0.02009 and values["val_acc"] == 0.9871
