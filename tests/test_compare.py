"""The study runner: workers, resume, W&B offline runs read back, the report, bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from examples.compare import check_variant, main, read_offline_run, run_study
from examples.studies import (
    Study,
    StudyError,
    epochs_to_target,
    known_studies,
    load_study,
    paired_difference,
    t_interval,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "limit_train_batches": 3, "logger": False,
                "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                "callbacks": []},
    "model": {"class_path": "examples.models.DigitsConvNet", "init_args": {"channels": [4, 4, 4], "lr": 0.003}},
    "data": {"class_path": "examples.data.DigitsDataModule", "init_args": {"batch_size": 64}},
}


class Boom(pl.Callback):
    """Crashes a run after its first epoch (a run that fails at training time, not at parse time)."""

    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("boom")


def tiny_study(tmp_path: Path, variants: dict[str, str] | None = None, **extra) -> Path:
    data = {"name": "tiny", "version": 1, "description": "Tiny digits ConvNet, 3 short epochs.",
            "config": TINY_CONFIG, "baseline": "slow", "target": 0.3,
            "variants": variants or {"slow": "--model.init_args.lr=0.0003", "fast": "--model.init_args.lr=0.01"},
            **extra}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_study_two_workers_wandb_offline_report_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default
    out = tmp_path / "out"
    lines: list[str] = []
    result = run_study(load_study(str(tiny_study(tmp_path))), [0, 1], workers=2, out=out, echo=lines.append)
    folder = out / "tiny"
    records = sorted((folder / "runs").glob("*.json"))
    assert [p.name for p in records] == ["fast-s0.json", "fast-s1.json", "slow-s0.json", "slow-s1.json"]
    rec = json.loads(records[0].read_text())
    assert {"variant", "seed", "args", "final", "history", "fit_seconds", "version"} <= set(rec)
    assert [h["epoch"] for h in rec["history"]] == [1, 2, 3] and 0.0 <= rec["final"]["val_acc"] <= 1.0
    assert rec["history"][-1]["val_acc"] == rec["final"]["val_acc"]
    assert not result["failed"] and "4 run(s) to train, 0 finished before" in lines[0]

    # W&B: 4 runs + 1 summary run, offline, read back from the .wandb files
    runs = {r["name"]: r for r in map(read_offline_run, sorted((folder / "wandb" / "wandb").glob("offline-run-*")))}
    assert sorted(runs) == ["fast-s0", "fast-s1", "slow-s0", "slow-s1", "tiny-summary"]
    for name, run in runs.items():
        assert run["group"] == "tiny-v1"
        if name == "tiny-summary":
            assert run["job_type"] == "summary"
            assert any(k.startswith("summary_table") for k in run["summary"]), run["summary"].keys()
            continue
        variant, seed = name.split("-s")
        assert run["job_type"] == variant and run["tags"] == ["tiny", "v1", variant, f"seed{seed}"]
        assert run["config"]["variant"] == variant and run["config"]["seed"] == int(seed)
        assert run["config"]["lr"] == pytest.approx(0.01 if variant == "fast" else 0.0003)
        final = json.loads((folder / "runs" / f"{name}.json").read_text())["final"]
        assert run["summary"]["val_acc"] == pytest.approx(final["val_acc"]) and "fit_seconds" in run["summary"]

    # report: table with mean ± std and the paired difference, PNGs that are PNGs
    report = (folder / "report.md").read_text()
    assert "| slow | 2 |" in report and "| fast | 2 |" in report and "baseline" in report
    fast = next(r for r in result["rows"] if r["variant"] == "fast")
    assert f"{fast['diff']:+.4f} [{fast['diff_low']:+.4f}, {fast['diff_high']:+.4f}] (n=2)" in report
    for png in ("curves.png", "epochs_to_target.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    assert "runner overhead" in report and result["timing"]["ratio"] > 0

    # resume: nothing is trained again, the records are untouched
    stamps = [p.stat().st_mtime_ns for p in records]
    lines.clear()
    again = run_study(load_study(str(tiny_study(tmp_path))), [0, 1], workers=2, out=out, wandb="disabled",
                      echo=lines.append)
    assert "0 run(s) to train, 4 finished before (kept)" in lines[0]
    assert [p.stat().st_mtime_ns for p in records] == stamps and len(again["records"]) == 4


@pytest.mark.slow
def test_crashed_run_reported_and_finished_runs_kept(tmp_path, capsys):
    variants = {"ok": "", "crash": "--trainer.callbacks+=tests.test_compare.Boom"}
    study = str(tiny_study(tmp_path, variants, baseline="ok"))
    out = str(tmp_path / "out")
    code = main(["--study", study, "--seeds", "0", "--workers", "2", "--out", out, "--wandb", "disabled"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == "error: 1 run(s) failed: crash-s0: RuntimeError: boom (see " + str(
        tmp_path / "out" / "tiny" / "runs" / "crash-s0.log") + ")"
    runs = tmp_path / "out" / "tiny" / "runs"
    assert sorted(p.name for p in runs.glob("*.json")) == ["ok-s0.json"]
    stamps = [p.stat().st_mtime_ns for p in sorted(runs.glob("*.json"))]
    # the fixed study resumes: only the crashed variant's runs train
    tiny_study(tmp_path, {"ok": "", "crash": "--model.init_args.lr=0.01"}, baseline="ok")
    assert main(["--study", study, "--seeds", "0", "--workers", "2", "--out", out, "--wandb", "disabled"]) == 0
    assert "1 run(s) to train, 1 finished before (kept)" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(runs.glob("ok-*.json"))] == stamps


BAD_INPUT = [  # (case, extra argv, environment WANDB_MODE, study variants, expected fragment of the one line)
    ("unknown study", ["--study", "nope"], None, None, "unknown study 'nope'; known: "),
    ("unknown variant", ["--variants", "zzz"], None, None, "unknown variant 'zzz' of study 'tiny'"),
    ("CLI rejects", [], None, {"ok": "", "bad": "--trainer.max_epochz=2"},
     "variant 'bad' of study 'tiny': unrecognized arguments: --trainer.max_epochz=2"),
    ("CLI value check", [], None, {"ok": "", "bad": "--model.init_args.lr=-1"}, "`lr` must be a positive"),
    ("unwritable out", ["--out", "FILE/sub"], None, None, "is not writable"),
    ("wandb typo", ["--wandb", "offlin"], None, None, "`--wandb` must be one of ('offline', 'online', 'disabled'), got 'offlin'"),
    ("WANDB_MODE typo", [], "ofline", None, "environment variable WANDB_MODE must be one of"),
    ("workers", ["--workers", "0"], None, None, "`--workers` must be an integer >= 1, got 0"),
    ("seeds", ["--seeds", "1", "1"], None, None, "`--seeds` must be distinct"),
    ("no study", ["--seeds", "1"], None, "NO-STUDY", "give either `--study NAME`"),
]


@pytest.mark.parametrize("case, argv, env, variants, fragment", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_one_line_exit_2_finished_runs_kept(case, argv, env, variants, fragment, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if env:
        monkeypatch.setenv("WANDB_MODE", env)
    study = tiny_study(tmp_path, variants if isinstance(variants, dict) else None, baseline="ok") if isinstance(
        variants, dict) else tiny_study(tmp_path)
    finished = tmp_path / "out" / "tiny" / "runs" / "slow-s0.json"
    finished.parent.mkdir(parents=True)
    finished.write_text('{"kept": true}')
    (tmp_path / "FILE").write_text("a file, not a folder")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    base = [] if variants == "NO-STUDY" or "--study" in argv else ["--study", str(study)]
    code = main([*base, "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert finished.read_text() == '{"kept": true}'


def test_bad_cli_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--study", "amsgrad", "--seeds", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "invalid int value: 'x'" in err


@pytest.mark.parametrize("name", known_studies())
def test_presets_load_and_every_variant_parses(name):
    study = load_study(name)
    assert study.version >= 1 and study.baseline in study.variants and study.description
    for variant in study.variants:
        assert check_variant(study.config, study.variant_args(variant)) is None, variant


def test_presets_cover_the_issue():
    assert {"super_convergence", "weight_decay", "amsgrad", "self_compression"} <= set(known_studies())
    sc = load_study("super_convergence")
    assert sc.target and "beta2=0.99" in sc.variants["one_cycle_wd"] and "lr=0.0003" in sc.variants["adam_3e-4"]
    assert load_study("self_compression").size_metric == "self_compression/bits_pct"


def test_requires_names_the_missing_callback(tmp_path):
    study = load_study(str(tiny_study(tmp_path, requires="pl_optim.callbacks.NoSuchTicket")))
    with pytest.raises(StudyError, match="needs pl_optim.callbacks.NoSuchTicket"):
        study.check_requirements()


@pytest.mark.parametrize("data, match", [
    ({"name": "x", "version": 1, "config": {}, "variants": {"a": ""}, "baseline": "b"}, "`baseline` must be one of"),
    ({"name": "x", "version": 0, "config": {}, "variants": {"a": ""}, "baseline": "a"}, "`version` must be an integer"),
    ({"name": "x", "version": 1, "config": {}, "variants": {}, "baseline": "a"}, "`variants` must be a non-empty"),
    ({"name": "x", "version": 1, "config": {}, "variants": {"a": ""}, "baseline": "a", "colour": 1}, "unknown study field 'colour'"),
    ({"name": "x", "version": 1, "config": "missing.yaml", "variants": {"a": ""}, "baseline": "a"}, "is not a file"),
    ({"name": "x", "version": 1, "config": {}, "variants": {"a b": ""}, "baseline": "a b"}, "plain names"),
])
def test_bad_study_files(tmp_path, data, match):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(StudyError, match=match):
        load_study(str(path))


@pytest.mark.parametrize("values, expected", [
    ([1.0, 2.0, 3.0], (2.0, 2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3))),  # t_{0.975,2}=4.3027
    ([0.5, 0.5], (0.5, 0.5, 0.5)),
])
def test_t_interval(values, expected):
    assert t_interval(values) == pytest.approx(expected, rel=1e-5)
    assert math.isnan(t_interval([1.0])[1])


def test_paired_difference_uses_common_seeds_only():
    mean, low, high, n = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.6, 5: 0.0})
    assert n == 2 and mean == pytest.approx(0.15) and low < 0.15 < high


@pytest.mark.parametrize("mode, target, expected", [("max", 0.8, 2), ("max", 0.85, 2), ("max", 0.99, None), ("min", 0.5, 2), ("max", 0.1, 1)])
def test_epochs_to_target(mode, target, expected):
    history = [{"epoch": 1, "val_acc": 0.5, "val_loss": 0.9}, {"epoch": 2, "val_acc": 0.85, "val_loss": 0.4}]
    metric = "val_acc" if mode == "max" else "val_loss"
    assert epochs_to_target(history, metric, target, mode) == expected


def test_report_size_plot_for_compression_studies(tmp_path):
    study = Study(name="sc", version=2, config={}, variants={"g0.1": "", "g1": ""}, baseline="g0.1",
                  size_metric="self_compression/bits_pct")
    records = [{"variant": v, "seed": s, "final": {"val_acc": acc - 0.01 * s, "self_compression/bits_pct": bits + s},
                "history": [{"epoch": 1, "val_acc": acc - 0.1}, {"epoch": 2, "val_acc": acc - 0.01 * s}],
                "fit_seconds": 1.0} for v, acc, bits in (("g0.1", 0.99, 9.0), ("g1", 0.95, 1.5)) for s in (0, 1, 2)]
    report, rows, pngs = write_report(study, records, ["g0.1", "g1"], tmp_path)
    assert [p.name for p in pngs] == ["curves.png", "size.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    text = report.read_text()
    assert "| g1 | 3 | 0.9400 ± 0.0100 | -0.0400 [+nan" not in text  # identical seeds spread -> interval is a point
    assert "-0.0400 [-0.0400, -0.0400] (n=3)" in text and "2.50 ± 1.00" in text


def test_wandb_sync_help_works():
    exe = Path(sys.executable).parent / "wandb"
    exe = str(exe) if exe.exists() else shutil.which("wandb")
    assert exe, "the wandb extra installs the `wandb` command"
    done = subprocess.run([exe, "sync", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Usage" in done.stdout and "sync" in done.stdout


@pytest.mark.slow
def test_adhoc_variants_from_the_command_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    code = main(["--config", str(config), "--seeds", "0", "--out", str(tmp_path), "--wandb", "disabled",
                 "--variant", "adam=", "--variant", "sgd=--model.init_args.optimizer=sgd --model.init_args.lr=0.05"])
    out = capsys.readouterr().out
    assert code == 0 and "| adam | 1 |" in out and "| sgd | 1 |" in out
    finals = [json.loads((tmp_path / "adhoc" / "runs" / f"{v}-s0.json").read_text())["final"] for v in ("adam", "sgd")]
    assert finals[0]["val_loss"] != finals[1]["val_loss"]  # different optimizers, different results
