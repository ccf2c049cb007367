"""Run a study — variants × seeds of one LightningCLI config — in worker processes, resumably,
logging to Weights & Biases offline by default, and write a report with mean ± std, paired
differences and plots::

    python -m examples.compare --list
    python -m examples.compare --study super_convergence --seeds 0 1 2 --workers 2
    python -m examples.compare --study weight_decay --variants l2_1e-6_lr1e-3 --seeds 0 1
    python -m examples.compare --config examples/configs/digits_convnet.yaml --seeds 0 1 \
        --variant "adam=" --variant "sgd=--model.init_args.optimizer=sgd --model.init_args.lr=0.05"

Every finished (variant, seed) run is written to ``<out>/<study>/runs/<variant>-s<seed>.json``
(final metrics, per-epoch history, the exact arguments); a later call with the same study
version and arguments reuses it instead of training again, so a crashed or interrupted study
resumes where it stopped. The report goes to ``<out>/<study>/report.md`` (+ PNGs).

W&B: one run per (variant, seed), all in the group ``<study>-v<version>``, ``job_type`` the
variant, tags ``[study, v<version>, variant, seed<N>]``, the final metrics in each run's summary,
and one extra ``job_type="summary"`` run holding the study table as a ``wandb.Table``. The mode
is ``--wandb`` if given, else ``WANDB_MODE`` if set, else ``offline`` — never online unless you
ask; upload later with ``wandb sync <out>/<study>/wandb/wandb/offline-run-*``.

Bad input (unknown study or variant, arguments LightningCLI rejects, an output folder that
cannot be written, a W&B mode typo) ends with one ``error: ...`` line and exit status 2; runs
already finished stay on disk.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import shlex
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from examples.studies import (
    EpochRecorder,
    Study,
    StudyError,
    load_records,
    load_study,
    markdown_table,
    write_report,
)

WANDB_MODES = ("offline", "online", "disabled")
RECORDER = "examples.studies.EpochRecorder"


class UserError(Exception):
    """Bad input: printed as one ``error:`` line, exit status 2."""


# --- one run (in a worker process) ----------------------------------------------------------------
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@contextmanager
def _output_to(path: Path):
    """Send this process's stdout/stderr (file descriptors, so Lightning's log handlers too) to ``path``."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def wandb_args(study: Study, variant: str, seed: int, project: str, save_dir: Path) -> list[str]:
    """WandbLogger arguments of one run: group per study version, job_type per variant, tags."""
    tags = [study.name, f"v{study.version}", variant, f"seed{seed}"]
    init = "--trainer.logger.init_args"
    return [
        "--trainer.logger=WandbLogger",
        f"{init}.project={project}",
        f"{init}.group={study.name}-v{study.version}",
        f"{init}.name={variant}-s{seed}",
        f"{init}.job_type={variant}",
        f"{init}.tags=[{','.join(tags)}]",
        f"{init}.save_dir={save_dir}",
    ]


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Train one (variant, seed) through the demo CLI; write and return its record.

    Returns ``{"error": line}`` instead when the run fails (its log keeps the details).
    """
    from examples.cli import main as cli_main

    t_start = time.perf_counter()
    os.environ["WANDB_MODE"] = task["wandb_mode"]
    record_path, log_path = Path(task["record"]), Path(task["record"]).with_suffix(".log")
    # per-run root folder: anything a callback writes by default (plots, lightning_logs) stays apart
    root = record_path.with_suffix("")
    args = [*task["args"], f"--trainer.default_root_dir={root}", f"--trainer.callbacks+={RECORDER}"]
    if task["wandb_mode"] != "disabled":
        args += task["wandb"]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        with _output_to(log_path):
            cli = cli_main(args)
            recorder = next(c for c in cli.trainer.callbacks if isinstance(c, EpochRecorder))
            final = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
            run_dir = None
            if task["wandb_mode"] != "disabled":
                run = cli.trainer.logger.experiment
                run.config.update({"study": task["study"], "study_version": task["version"], "variant": task["variant"],
                                   "seed": task["seed"], "cli_args": " ".join(task["args"])}, allow_val_change=True)
                run.summary.update({**final, "fit_seconds": recorder.fit_seconds})
                run_dir = str(Path(run.dir).parent)
                run.finish()
    except SystemExit as exit_:
        lines = [line for line in log_path.read_text().splitlines() if line.startswith("error:")]
        return {"error": lines[-1] if lines else f"LightningCLI exited with status {exit_.code} (see {log_path})"}
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the study
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (see {log_path})"}
    record = {
        "study": task["study"], "version": task["version"], "variant": task["variant"], "seed": task["seed"],
        "args": task["args"], "final": final, "history": recorder.history, "fit_seconds": recorder.fit_seconds,
        "task_seconds": time.perf_counter() - t_start, "wandb_dir": run_dir,
    }
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(record_path)  # atomic: a crash never leaves half a record
    return record


# --- checks before anything runs ------------------------------------------------------------------
def wandb_mode(option: str | None) -> str:
    """``--wandb``, else ``WANDB_MODE``, else ``"offline"``; a typo in either is a :class:`UserError`."""
    if option is not None:
        if option not in WANDB_MODES:
            raise UserError(f"`--wandb` must be one of {WANDB_MODES}, got {option!r}")
        return option
    env = os.environ.get("WANDB_MODE")
    if env is None or env == "":
        return "offline"
    if env not in WANDB_MODES:
        raise UserError(f"environment variable WANDB_MODE must be one of {WANDB_MODES}, got {env!r}")
    return env


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it, or raise a :class:`UserError`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {str(folder)!r} is not writable: {err.strerror or err}") from None


def check_variant(config: str, args: list[str]) -> str | None:
    """Parse and instantiate one variant's configuration (no training); the error line or None."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from examples.cli import DemoCLI, one_line

    quiet = logging.getLogger("lightning.fabric"), logging.getLogger("lightning.pytorch")
    levels = [log.level for log in quiet]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    for log in quiet:
        log.setLevel(logging.WARNING)
    try:
        DemoCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                seed_everything_default=0, save_config_callback=None, run=False,
                parser_kwargs={"exit_on_error": False}, args=["--config", config, *args])
    except (argparse.ArgumentError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        return one_line(str(err))
    except SystemExit:
        return "LightningCLI rejected the arguments"
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return None


# --- the study ----------------------------------------------------------------------------------
def run_study(
    study: Study,
    seeds: list[int],
    variants: list[str] | None = None,
    workers: int = 1,
    out: str | Path = "outputs",
    wandb: str | None = None,
    project: str = "pl_optim",
    rerun: bool = False,
    threads: int = 1,
    command: str = "",
    echo=print,
) -> dict[str, Any]:
    """Run every missing (variant, seed) of ``study``, then write the report.

    Args:
        study: the study.
        seeds: seeds to run each variant with.
        variants: a subset of the study's variants (default: all).
        workers: worker processes (runs in parallel).
        out: parent folder; the study writes into ``out/<study.name>``.
        wandb: W&B mode (``None``: ``WANDB_MODE`` or offline).
        project: W&B project.
        rerun: train again even the runs that finished before.
        threads: torch threads per worker.
        command: the command line, quoted in the report.
        echo: where progress lines go.

    Returns:
        ``{"report": path, "rows": table rows, "records": run records, "failed": {run: error},
        "timing": {...}}``.

    Raises:
        UserError: bad input; nothing was trained.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"`--workers` must be an integer >= 1, got {workers!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"`--seeds` must be distinct integers, got {seeds!r}")
    mode = wandb_mode(wandb)
    os.environ["WANDB_MODE"] = mode  # for this process's summary run and the forked workers
    try:
        study.check_requirements()
        names = study.select(variants)
    except StudyError as err:
        raise UserError(str(err)) from None
    if mode != "disabled":
        try:
            import wandb as _  # noqa: F401
        except ImportError:
            raise UserError('W&B logging needs wandb: pip install "pl-optim[wandb]", or pass --wandb disabled') from None
    folder = Path(out) / study.name
    runs_dir = folder / "runs"
    check_writable(runs_dir)
    config = study.config
    if isinstance(config, dict):
        config = str(folder / "base.yaml")
        Path(config).write_text(yaml.safe_dump(study.config, sort_keys=False))

    tasks, kept = [], 0
    for variant in names:
        for seed in seeds:
            record = runs_dir / f"{variant}-s{seed}.json"
            args = study.run_args(variant, seed, config)
            if record.is_file() and not rerun:
                old = json.loads(record.read_text())
                if old.get("args") == args and old.get("version") == study.version:
                    kept += 1
                    continue
                echo(f"[compare] {record.name}: arguments or version changed, running it again")
            tasks.append({
                "study": study.name, "version": study.version, "variant": variant, "seed": seed, "args": args,
                "record": str(record), "wandb_mode": mode,
                "wandb": wandb_args(study, variant, seed, project, folder / "wandb"),
            })
    for variant in dict.fromkeys(t["variant"] for t in tasks):
        problem = check_variant(config, study.variant_args(variant))
        if problem:
            raise UserError(f"variant {variant!r} of study {study.name!r}: {problem}")

    echo(f"[compare] study {study.name!r} v{study.version}: {len(tasks)} run(s) to train, {kept} finished "
         f"before (kept), {min(workers, max(len(tasks), 1))} worker(s), W&B {mode}")
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    if tasks:
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_init_worker,
                                    initargs=(threads,)) as pool:
            futures = {pool.submit(run_one, task): task for task in tasks}
            for i, future in enumerate(cf.as_completed(futures), 1):
                task = futures[future]
                label = f"{task['variant']}-s{task['seed']}"
                try:
                    result = future.result()
                except Exception as err:  # noqa: BLE001 - a worker died (killed, out of memory)
                    result = {"error": f"worker died: {type(err).__name__}: {err}"}
                if "error" in result:
                    failed[label] = result["error"]
                    echo(f"[compare] {i}/{len(tasks)} {label} FAILED: {result['error']}")
                else:
                    value = result["final"].get(study.metric, float("nan"))
                    echo(f"[compare] {i}/{len(tasks)} {label} {study.metric}={value:.4f} "
                         f"(fit {result['fit_seconds']:.1f}s)")
    wall = time.perf_counter() - t0

    records = [r for r in load_records(runs_dir) if r.get("version") == study.version and r["seed"] in seeds]
    timing = overhead(records, tasks, failed, wall, min(workers, max(len(tasks), 1)))
    if timing:
        echo(f"[compare] {timing['text']}")
    report, rows, pngs = write_report(study, records, names, folder, command=command, timing=timing.get("text", ""))
    if mode != "disabled" and rows:
        log_summary(study, rows, records, pngs, mode, project, folder / "wandb")
    echo(f"[compare] report: {report}" + (f"; W&B ({mode}) runs in {folder / 'wandb' / 'wandb'}" if mode != "disabled" else ""))
    return {"report": report, "rows": rows, "records": records, "failed": failed, "timing": timing}


def overhead(records: list[dict], tasks: list[dict], failed: dict, wall: float, workers: int) -> dict[str, Any]:
    """The runner's own cost: this call's wall time against the ideal schedule of the fits that ran.

    ``ideal_slowest`` = slowest variant's mean fit time × runs ÷ workers (the issue's bound);
    ``ideal_sum`` = sum of the fit times ÷ workers (perfect packing).
    """
    ran = {(t["variant"], t["seed"]) for t in tasks}
    fits = [r for r in records if (r["variant"], r["seed"]) in ran]
    if not fits or failed:
        return {}
    per_variant: dict[str, list[float]] = {}
    for r in fits:
        per_variant.setdefault(r["variant"], []).append(r["fit_seconds"])
    slowest = max(sum(v) / len(v) for v in per_variant.values())
    ideal_slowest = slowest * len(fits) / workers
    ideal_sum = sum(r["fit_seconds"] for r in fits) / workers
    text = (f"runner overhead: {len(fits)} runs on {workers} worker(s) took {wall:.1f}s wall; slowest variant "
            f"{slowest:.1f}s/fit x {len(fits)} runs / {workers} = {ideal_slowest:.1f}s -> ratio "
            f"{wall / ideal_slowest:.3f} (target <= 1.2); vs sum of fits / workers ({ideal_sum:.1f}s): "
            f"{wall / ideal_sum:.3f}")
    return {"wall": wall, "ideal_slowest": ideal_slowest, "ideal_sum": ideal_sum,
            "ratio": wall / ideal_slowest, "ratio_sum": wall / ideal_sum, "text": text}


def log_summary(study: Study, rows: list[dict], records: list[dict], pngs: list[Path], mode: str, project: str,
                save_dir: Path) -> None:
    """One ``job_type="summary"`` W&B run in the study's group: the table, the per-run rows, the PNGs."""
    import wandb

    columns = ["variant", "seeds", f"{study.metric}_mean", f"{study.metric}_std", "diff_vs_baseline",
               "diff_low95", "diff_high95", "fit_seconds"]
    data = [[r["variant"], r["seeds"], r["mean"], r["std"], r.get("diff"), r.get("diff_low"), r.get("diff_high"),
             r["fit_seconds"]] for r in rows]
    run_columns = ["variant", "seed", study.metric, "fit_seconds"]
    run_data = [[r["variant"], r["seed"], r["final"].get(study.metric), r["fit_seconds"]] for r in records]
    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=f"{study.name}-v{study.version}", name=f"{study.name}-summary",
                     job_type="summary", tags=[study.name, f"v{study.version}", "summary"], dir=str(save_dir),
                     mode=mode, config={"study": study.name, "study_version": study.version,
                                        "baseline": study.baseline, "metric": study.metric})
    run.log({"summary_table": wandb.Table(columns=columns, data=data),
             "runs_table": wandb.Table(columns=run_columns, data=run_data),
             **{f"plots/{p.stem}": wandb.Image(str(p)) for p in pngs}})
    run.summary.update({f"{r['variant']}/{study.metric}_mean": r["mean"] for r in rows})
    run.finish()
    wandb.teardown()  # wait for W&B's service to write everything: the offline files are complete on return


# --- reading offline runs back -----------------------------------------------------------------
def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """What an offline W&B run folder holds, parsed from its ``run-*.wandb`` file with wandb's own
    protobuf records: ``{"name", "group", "job_type", "tags", "config", "summary", "history_keys"}``.

    The file is a LevelDB-style log (7-byte header ``:W&B``, 32 KiB blocks, records framed as
    ``crc32 | length | type``, types FULL/FIRST/MIDDLE/LAST); each payload is a ``Record``.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    block, pos, chunks, payloads = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST ends a record
            payloads.append(b"".join(chunks))
            chunks = []
    out: dict[str, Any] = {"config": {}, "summary": {}, "history_keys": set(), "tags": []}

    def items(update):
        for item in update:
            key = item.key or "/".join(item.nested_key)
            yield key, json.loads(item.value_json)

    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, job_type=run.job_type, tags=list(run.tags),
                       project=run.project)
            out["config"].update({k: v.get("value", v) if isinstance(v, dict) else v for k, v in items(run.config.update)})
        elif kind == "config":
            out["config"].update({k: v.get("value", v) if isinstance(v, dict) else v
                                  for k, v in items(record.config.update)})
        elif kind == "summary":
            out["summary"].update(dict(items(record.summary.update)))
        elif kind == "history":
            out["history_keys"].update(k for k, _ in items(record.history.item))
    return out


# --- command line ---------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error: ...`` line (no usage block), exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def adhoc_study(name: str, config: str, variant_specs: list[str]) -> Study:
    """A study from ``--config`` and ``--variant NAME=ARGS`` options."""
    variants = {}
    for text in variant_specs:
        key, sep, rest = text.partition("=")
        if not sep:
            raise UserError(f"`--variant` must look like NAME=ARGS, got {text!r}")
        if key.strip() in variants:
            raise UserError(f"`--variant` names must be unique, got {key.strip()!r} twice")
        variants[key.strip()] = rest
    if not os.path.isfile(config):
        raise UserError(f"`--config` {config!r} is not a file")
    try:
        return Study(name=name, version=1, config=config, variants=variants, baseline=next(iter(variants)))
    except StudyError as err:
        raise UserError(str(err)) from None


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--study", help="preset name (see --list) or a study .yaml path")
    parser.add_argument("--list", action="store_true", help="list the preset studies and exit")
    parser.add_argument("--variants", nargs="+", help="run only these variants of the study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--out", default="outputs", help="parent output folder (default outputs)")
    parser.add_argument("--wandb", default=None, help=f"W&B mode {WANDB_MODES}; default WANDB_MODE, else offline")
    parser.add_argument("--project", default="pl_optim", help="W&B project")
    parser.add_argument("--rerun", action="store_true", help="train again the runs that finished before")
    parser.add_argument("--config", help="ad-hoc study: base LightningCLI YAML (with --variant)")
    parser.add_argument("--variant", action="append", default=[], help="ad-hoc study: NAME=EXTRA_ARGS")
    parser.add_argument("--name", default="adhoc", help="ad-hoc study name (output folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 some runs failed, 2 bad input)."""
    from examples.studies import known_studies

    ns = build_parser().parse_args(argv)
    try:
        if ns.list:
            for name in known_studies():
                s = load_study(name)
                print(f"{name} (v{s.version}): {', '.join(s.variants)} — {s.description.strip().splitlines()[0]}")
            return 0
        if bool(ns.study) == bool(ns.variant):
            raise UserError("give either `--study NAME` or `--config FILE --variant NAME=ARGS ...`")
        try:
            study = load_study(ns.study) if ns.study else adhoc_study(ns.name, ns.config or "", ns.variant)
        except StudyError as err:
            raise UserError(str(err)) from None
        command = "python -m examples.compare " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        result = run_study(study, ns.seeds, ns.variants, ns.workers, ns.out, ns.wandb, ns.project, ns.rerun,
                           ns.threads, command)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(study, result["rows"]))
    if result["failed"]:
        print(f"error: {len(result['failed'])} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items()),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
