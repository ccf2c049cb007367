"""Named, versioned studies for :mod:`examples.compare`, their statistics and their report.

A *study* is data: a base LightningCLI YAML, arguments shared by every variant, and named
variants (extra CLI arguments each), plus what to report (the metric, the baseline, an
accuracy target, a size metric). Presets live in ``examples/configs/studies/<name>.yaml``::

    name: amsgrad
    version: 1
    description: Adam with and without AMSGrad's max of the second moments.
    config: examples/configs/digits_convnet.yaml     # or an inline mapping
    common: --trainer.max_epochs=8
    baseline: adam
    variants:
      adam: ""
      amsgrad: --trainer.callbacks+=pl_optim.callbacks.AMSGradToggle --trainer.callbacks.schedule='{0: true}'

Bump ``version`` whenever a preset's arguments change: finished runs are reused only when the
study version and every argument of the run are unchanged.

This module also holds the per-epoch recorder every run carries (:class:`EpochRecorder`), the
statistics of the report (mean ± std, paired t-interval, epochs to target) and the report writer
(``report.md`` and PNGs).

Example::

    study = load_study("amsgrad")
    study.run_args("amsgrad", seed=1)   # the LightningCLI arguments of one run
"""

from __future__ import annotations

import importlib
import json
import math
import shlex
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / "examples" / "configs" / "studies"
STUDY_KEYS = {
    "name", "version", "description", "config", "common", "variants", "baseline", "metric", "mode",
    "target", "size_metric", "requires",
}


class StudyError(ValueError):
    """A study that cannot run as asked (unknown name or variant, bad field); one line."""


@dataclass
class Study:
    """One comparison: variants of a base config, each run for several seeds.

    Args:
        name: study name (also the output folder ``outputs/<name>``).
        version: preset version; bump it when arguments change (finished runs are then re-run).
        config: base LightningCLI YAML (path) or an inline mapping of it.
        variants: variant name -> extra LightningCLI arguments (a string, split like a shell).
        baseline: the variant every other one is compared with (paired over seeds).
        common: arguments added to every variant before its own.
        metric: the headline metric (a logged scalar, e.g. ``"val_acc"``).
        mode: ``"max"`` if larger ``metric`` is better, else ``"min"``.
        target: report the first epoch whose ``metric`` reaches it (``None``: no target).
        size_metric: a model-size metric (e.g. ``"self_compression/bits_pct"``) to plot against.
        description: one or two sentences for the report.
        requires: importable names (``"pl_optim.callbacks.LotteryTicket"``) the study needs.

    Raises:
        StudyError: an empty or badly named variant set, an unknown baseline or mode.
    """

    name: str
    version: int
    config: str | dict
    variants: dict[str, str]
    baseline: str
    common: str = ""
    metric: str = "val_acc"
    mode: str = "max"
    target: float | None = None
    size_metric: str | None = None
    description: str = ""
    requires: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.replace("-", "_").isidentifier():
            raise StudyError(f"study `name` must be a plain identifier, got {self.name!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise StudyError(f"study `version` must be an integer >= 1, got {self.version!r}")
        if not isinstance(self.variants, Mapping) or not self.variants:
            raise StudyError(f"study `variants` must be a non-empty mapping name -> arguments, got {self.variants!r}")
        for key, args in self.variants.items():
            if not isinstance(key, str) or not key.replace("-", "_").replace(".", "_").isidentifier():
                raise StudyError(f"variant names must be plain names (letters, digits, _ - .), got {key!r}")
            if args is not None and not isinstance(args, str):
                raise StudyError(f"variant {key!r} must map to a string of CLI arguments, got {args!r}")
        self.variants = {k: v or "" for k, v in self.variants.items()}
        if self.baseline not in self.variants:
            raise StudyError(f"study `baseline` must be one of its variants {list(self.variants)}, got {self.baseline!r}")
        if self.mode not in ("max", "min"):
            raise StudyError(f"study `mode` must be 'max' or 'min', got {self.mode!r}")
        if self.target is not None and not (isinstance(self.target, (int, float)) and math.isfinite(self.target)):
            raise StudyError(f"study `target` must be a finite number or null, got {self.target!r}")
        self.requires = [self.requires] if isinstance(self.requires, str) else list(self.requires or [])

    def check_requirements(self) -> None:
        """Raise :class:`StudyError` naming the first required object that cannot be imported."""
        for dotted in self.requires:
            module, _, attr = dotted.rpartition(".")
            try:
                ok = hasattr(importlib.import_module(module), attr)
            except ImportError:
                ok = False
            if not ok:
                raise StudyError(f"study {self.name!r} needs {dotted}, which this installation does not provide")

    def select(self, names: Sequence[str] | None) -> list[str]:
        """The variants to run: ``names`` (checked) or all, in the study's order."""
        if not names:
            return list(self.variants)
        unknown = [n for n in names if n not in self.variants]
        if unknown:
            raise StudyError(f"unknown variant {unknown[0]!r} of study {self.name!r}; known: {', '.join(self.variants)}")
        return [n for n in self.variants if n in names]

    def variant_args(self, variant: str) -> list[str]:
        """The study's common arguments followed by the variant's own."""
        return shlex.split(self.common) + shlex.split(self.variants[variant])

    def run_args(self, variant: str, seed: int, config_path: str | Path) -> list[str]:
        """LightningCLI ``fit`` arguments of one run (logger and recorder not included)."""
        return ["fit", "--config", str(config_path), f"--seed_everything={seed}", *self.variant_args(variant)]


def _resolve_config(value: Any, origin: Path | None) -> str | dict:
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise StudyError(f"study `config` must be a YAML path or a mapping, got {value!r}")
    candidates = [Path(value)] + ([origin.parent / value] if origin else []) + [ROOT / value]
    for path in candidates:
        if path.is_file():
            return str(path)
    raise StudyError(f"study `config` {value!r} is not a file")


def study_from_mapping(data: Mapping[str, Any], origin: Path | None = None) -> Study:
    """Build a :class:`Study` from a parsed study YAML (unknown keys are an error)."""
    if not isinstance(data, Mapping):
        raise StudyError(f"a study file must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - STUDY_KEYS)
    if unknown:
        raise StudyError(f"unknown study field {unknown[0]!r}; fields: {', '.join(sorted(STUDY_KEYS))}")
    missing = [k for k in ("name", "version", "config", "variants", "baseline") if k not in data]
    if missing:
        raise StudyError(f"study field {missing[0]!r} is missing")
    fields = dict(data)
    fields["config"] = _resolve_config(fields["config"], origin)
    return Study(**fields)


def known_studies() -> list[str]:
    """Names of the presets in ``examples/configs/studies``."""
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study(name_or_path: str) -> Study:
    """A preset by name (``"super_convergence"``) or a study YAML by path.

    Raises:
        StudyError: unknown name, unreadable file or bad field (one line naming it).
    """
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = STUDY_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise StudyError(f"unknown study {name_or_path!r}; known: {', '.join(known_studies())} (or a study .yaml path)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"cannot read study file {str(path)!r}: {str(err).splitlines()[0]}") from None
    return study_from_mapping(data, origin=path)


# --- what a run records -------------------------------------------------------------------------
class EpochRecorder(pl.Callback):
    """Keeps every epoch's scalar metrics (``history``) for the report's curves.

    An epoch is recorded once all of its metrics are final: at the start of the next epoch, and
    at the end of fit for the last one. Entries are ``{"epoch": n, "seconds": t, **metrics}``
    with ``n`` counted from 1 and ``t`` the seconds since fit started.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._pending: int | None = None
        self._t0 = 0.0
        self._t_end = 0.0
        self.fit_seconds = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._pending, self._t_end = trainer.current_epoch + 1, time.perf_counter() - self._t0

    def _flush(self, trainer: pl.Trainer) -> None:
        if self._pending is None:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.history.append({"epoch": self._pending, "seconds": self._t_end, **metrics})
        self._pending = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._flush(trainer)
        self.fit_seconds = time.perf_counter() - self._t0


# --- statistics ----------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student-t interval of the mean (``nan`` bounds for one value)."""
    from scipy import stats

    mean, sd = mean_std(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_difference(runs: Mapping[int, float], base: Mapping[int, float]) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of ``runs[s] - base[s]`` over the seeds both have (95% t-interval)."""
    seeds = sorted(set(runs) & set(base))
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    return (*t_interval([runs[s] - base[s] for s in seeds]), len(seeds))


def epochs_to_target(history: Sequence[Mapping[str, float]], metric: str, target: float, mode: str = "max") -> int | None:
    """The first epoch (from 1) whose ``metric`` reaches ``target``; ``None`` if none does."""
    for row in history:
        value = row.get(metric)
        if value is not None and (value >= target if mode == "max" else value <= target):
            return int(row["epoch"])
    return None


def fmt(mean: float, sd: float | None = None, digits: int = 4) -> str:
    """``"0.9861 ± 0.0021"`` (or just the mean)."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


# --- the report ----------------------------------------------------------------------------------
def load_records(runs_dir: Path) -> list[dict]:
    """Every finished run record (``<variant>-s<seed>.json``) in ``runs_dir``."""
    return [json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*.json"))]


def summary_rows(study: Study, records: Sequence[Mapping], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row a variant: seeds, metric mean/std, paired difference to the baseline, epochs to
    target, size metric, fit seconds — the numbers of the report table and the W&B table."""
    by_variant = {v: {r["seed"]: r for r in records if r["variant"] == v} for v in variants}
    base = {s: r["final"][study.metric] for s, r in by_variant.get(study.baseline, {}).items() if study.metric in r["final"]}
    rows = []
    for v in variants:
        runs = by_variant[v]
        if not runs:
            continue
        values = {s: r["final"][study.metric] for s, r in runs.items() if study.metric in r["final"]}
        mean, sd = mean_std(values.values()) if values else (math.nan, math.nan)
        row: dict[str, Any] = {"variant": v, "seeds": len(runs), "mean": mean, "std": sd}
        if v != study.baseline and values and base:
            row["diff"], row["diff_low"], row["diff_high"], row["paired"] = paired_difference(values, base)
        if study.target is not None:
            hits = [epochs_to_target(r["history"], study.metric, study.target, study.mode) for r in runs.values()]
            row["epochs_to_target"] = hits
        if study.size_metric:
            sizes = [r["final"][study.size_metric] for r in runs.values() if study.size_metric in r["final"]]
            row["size_mean"], row["size_std"] = mean_std(sizes) if sizes else (math.nan, math.nan)
        row["fit_seconds"] = statistics.fmean(r["fit_seconds"] for r in runs.values())
        rows.append(row)
    return rows


def _hits_text(hits: Sequence[int | None]) -> str:
    reached = sorted(h for h in hits if h is not None)
    if not reached:
        return f"not reached (0/{len(hits)})"
    text = f"{statistics.median(reached):g} [{reached[0]}–{reached[-1]}]"
    return text + ("" if len(reached) == len(hits) else f" ({len(reached)}/{len(hits)} reached)")


def markdown_table(study: Study, rows: Sequence[Mapping[str, Any]]) -> str:
    """The report's table (GitHub markdown)."""
    head = ["variant", "seeds", f"{study.metric} (mean ± std)", f"Δ vs {study.baseline} [95% CI]"]
    if study.target is not None:
        head.append(f"epochs to {study.metric} ≥ {study.target:g} (median [min–max])")
    if study.size_metric:
        head.append(f"{study.size_metric} (mean ± std)")
    head.append("fit s/run")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["variant"] == study.baseline:
            diff = "baseline"
        elif "diff" in row:
            ci = "" if math.isnan(row["diff_low"]) else f" [{row['diff_low']:+.4f}, {row['diff_high']:+.4f}]"
            diff = f"{row['diff']:+.4f}{ci} (n={row['paired']})"
        else:
            diff = "-"
        cells = [row["variant"], str(row["seeds"]), fmt(row["mean"], row["std"]), diff]
        if study.target is not None:
            cells.append(_hits_text(row["epochs_to_target"]))
        if study.size_metric:
            cells.append(fmt(row["size_mean"], row["size_std"], 2))
        cells.append(f"{row['fit_seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve(records: Sequence[Mapping], metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs every seed has, with the mean, min and max of ``metric`` over seeds."""
    per_epoch: dict[int, list[float]] = {}
    for r in records:
        for row in r["history"]:
            if metric in row:
                per_epoch.setdefault(int(row["epoch"]), []).append(row[metric])
    epochs = [e for e in sorted(per_epoch) if len(per_epoch[e]) == len(records)]
    return (epochs, [statistics.fmean(per_epoch[e]) for e in epochs], [min(per_epoch[e]) for e in epochs],
            [max(per_epoch[e]) for e in epochs])


def plot_curves(study: Study, records: Sequence[Mapping], variants: Sequence[str], path: Path) -> Path:
    """``metric`` vs epoch, one line a variant (mean over seeds) and the min–max band of the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    for v in variants:
        runs = [r for r in records if r["variant"] == v]
        epochs, mean, low, high = _curve(runs, study.metric)
        if not epochs:
            continue
        (line,) = ax.plot(epochs, mean, marker=".", label=f"{v} (n={len(runs)})")
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if study.target is not None:
        ax.axhline(study.target, color="grey", linestyle="--", linewidth=1, label=f"target {study.target:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(study.metric)
    ax.set_title(f"{study.name} v{study.version}: mean over seeds, band = min–max", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_size(study: Study, rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``metric`` vs ``size_metric`` per variant (mean ± std over seeds as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    for row in rows:
        ax.errorbar(row["size_mean"], row["mean"], xerr=row["size_std"], yerr=row["std"], fmt="o", capsize=3)
        ax.annotate(row["variant"], (row["size_mean"], row["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(study.size_metric)
    ax.set_ylabel(study.metric)
    ax.set_title(f"{study.name} v{study.version}: mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_epochs_to_target(study: Study, rows: Sequence[Mapping[str, Any]], max_epochs: int, path: Path) -> Path:
    """Bars: median epochs to target per variant; dots: each seed; crosses: seeds that never got there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    for i, row in enumerate(rows):
        hits = row["epochs_to_target"]
        reached = [h for h in hits if h is not None]
        if reached:
            ax.bar(i, statistics.median(reached), color=f"C{i}", alpha=0.6)
            ax.scatter([i] * len(reached), reached, color="k", s=12, zorder=3)
        missed = len(hits) - len(reached)
        if missed:
            ax.scatter([i] * missed, [max_epochs + 0.5] * missed, marker="x", color="r", zorder=3)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel(f"epochs to {study.metric} ≥ {study.target:g}")
    ax.set_title(f"{study.name} v{study.version}: bar = median, dots = seeds, x = not reached", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(study: Study, records: Sequence[Mapping], variants: Sequence[str], out_dir: Path,
                 command: str = "", timing: str = "") -> tuple[Path, list[dict[str, Any]], list[Path]]:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the report path, table rows and PNGs."""
    out_dir = Path(out_dir)
    records = [r for r in records if r["variant"] in variants]
    rows = summary_rows(study, records, variants)
    pngs = [plot_curves(study, records, variants, out_dir / "curves.png")]
    if study.size_metric and rows and all(not math.isnan(r["size_mean"]) for r in rows):
        pngs.append(plot_size(study, rows, out_dir / "size.png"))
    if study.target is not None and rows:
        max_epochs = max((int(h["epoch"]) for r in records for h in r["history"]), default=1)
        pngs.append(plot_epochs_to_target(study, rows, max_epochs, out_dir / "epochs_to_target.png"))
    seeds = sorted({r["seed"] for r in records})
    text = [
        f"# Study `{study.name}` (version {study.version})",
        "",
        study.description.strip(),
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Baseline: `{study.baseline}`. Δ is the paired difference "
        f"of the final `{study.metric}` (same seed), with a 95% Student-t interval over seeds.",
        "",
        markdown_table(study, rows),
        "",
        *[f"![{p.stem}]({p.name})" for p in pngs],
        "",
        "Variants (LightningCLI arguments on top of the base config):",
        "",
        *[f"* `{v}`: `{' '.join(study.variant_args(v)) or '(base config)'}`" for v in variants],
    ]
    if command:
        text += ["", f"Command: `{command}`"]
    if timing:
        text += ["", timing]
    path = out_dir / "report.md"
    path.write_text("\n".join(text).replace("\n\n\n", "\n\n") + "\n")
    return path, rows, pngs
