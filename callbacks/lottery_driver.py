"""The rounds of a lottery-ticket search, one ``Trainer.fit`` each (open_lth's levels).

Round 0 trains the dense network and writes the rewind checkpoint (a real Lightning checkpoint
at step ``k``, or before the first step for ``"init"``). Round ``r >= 1`` prunes the trained
ticket of round ``r - 1`` (:func:`pl_optim.lottery.magnitude_masks`, or whole channels with
:func:`pl_optim.lottery.prune_channels`) and trains the survivors with
``Trainer.fit(ckpt_path=rewind.ckpt)``: weights, optimizer, loops and the state of every callback
(``OneCycle``/``ParamScheduler`` positions, ``DecoupledWeightDecay``) are those of step ``k``,
then :class:`LotteryTicket` applies the masks. Controls per round: ``"reinit"`` (same masks,
weights re-drawn) and ``"random_masks"`` (random masks of the same per-layer sparsity, rewound
weights).

Kill-safety: every finished run writes its record (masks, trained weights, metrics) atomically to
``directory``; calling :func:`find_ticket` again with the same settings skips finished runs and
reruns an interrupted one from its start (seeded the same way), so the masks and final weights
equal those of an uninterrupted search.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from pl_optim.callbacks.lottery_ticket import LotteryTicket, check_rewind_to
from pl_optim.checks import boolean, fraction, integer, one_of, patterns
from pl_optim.compression.surgery import apply_kept
from pl_optim.lottery.masks import (
    SCOPES,
    magnitude_masks,
    ones_masks,
    prunable_weights,
    random_masks,
    remaining,
)
from pl_optim.lottery.structured import NORMS, kept_from_lists, kept_to_lists, parameter_count, prune_channels

CONTROLS: tuple[str, ...] = ("reinit", "random_masks")
_MANIFEST = "manifest.json"


@dataclass
class TicketRun:
    """One fit of the search, given to ``trainer_fn`` (name loggers after it)."""

    round: int
    kind: str  # "ticket", "reinit" or "random_masks"
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return f"round{self.round:02d}-{self.kind}"


@dataclass
class TicketResult:
    """What :func:`find_ticket` returns.

    Attributes:
        runs: one row per fit: ``round``, ``kind``, ``remaining`` (fraction of prunable
            weights), ``params``, ``metrics`` (final ``trainer.callback_metrics``).
        masks: the final ticket's masks (``None`` when structured).
        kept: the final ticket's channel record (``{}`` when unstructured).
        state_dict: the final ticket's trained weights.
    """

    runs: list[dict[str, Any]] = field(default_factory=list)
    masks: dict[str, torch.Tensor] | None = None
    kept: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)

    def metric(self, kind: str, name: str) -> list[tuple[float, float]]:
        """``(remaining, metric)`` per round for runs of ``kind``."""
        return [(r["remaining"], r["metrics"].get(name, float("nan"))) for r in self.runs if r["kind"] == kind]

    def table(self, metric: str = "val_acc") -> str:
        """Per-round table: % weights remaining, parameters and ``metric`` of ticket and controls."""
        kinds = list(dict.fromkeys(r["kind"] for r in self.runs))
        head = f"{'round':>5} {'% weights':>9} {'params':>8} " + " ".join(f"{k:>12}" for k in kinds)
        rows = [head]
        for rnd in sorted({r["round"] for r in self.runs}):
            by = {r["kind"]: r for r in self.runs if r["round"] == rnd}
            t = by["ticket"]
            cells = " ".join(f"{by[k]['metrics'].get(metric, float('nan')):12.4f}" if k in by else f"{'':>12}" for k in kinds)
            rows.append(f"{rnd:5d} {100 * t['remaining']:9.2f} {t['params']:8d} {cells}")
        return "\n".join(rows)

    def ticket(self, model_fn: Callable[[], LightningModule]) -> LightningModule:
        """The final ticket as a model of the user's class (shrunk when structured)."""
        model = model_fn()
        if self.kept:
            apply_kept(model, kept_from_lists(self.kept))
        model.load_state_dict(self.state_dict)
        return model


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic


def _example_input(model: LightningModule, datamodule: LightningDataModule | None) -> tuple:
    if model.example_input_array is not None:
        ex = model.example_input_array
        return tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)
    if datamodule is None:
        raise ValueError("structured pruning needs an example input: set `example_input_array` or pass a datamodule")
    with torch.random.fork_rng(devices=[]):
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return (x[:2],)


def find_ticket(
    model_fn: Callable[[], LightningModule],
    trainer_fn: Callable[[TicketRun], Trainer],
    datamodule: LightningDataModule | None = None,
    *,
    rounds: int = 5,
    prune_fraction: float = 0.2,
    rewind_to: int | str = "init",
    scope: str = "global",
    output_fraction: float | None = None,
    layers: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    structured: bool = False,
    norm: str = "l1",
    controls: Sequence[str] = CONTROLS,
    directory: str | os.PathLike = "outputs/lottery",
    seed: int = 0,
) -> TicketResult:
    """Iterative magnitude pruning with rewinding (see the module docstring and
    ``docs/lottery_ticket.md``).

    Args:
        model_fn: builds a fresh, full-size model (called under ``seed_everything(seed)``, so the
            initialisation is the same every time).
        trainer_fn: builds the Trainer of one run (``TicketRun``: round, kind, seed, name); the
            driver adds its :class:`LotteryTicket` callback. Every run must train equally long.
        datamodule: passed to ``Trainer.fit``.
        rounds: pruning rounds after the dense round 0 (>= 1).
        prune_fraction: fraction of the remaining weights (channels) pruned per round, in (0, 1).
        rewind_to: ``"init"`` or the optimizer step ``k`` of round 0 to rewind to.
        scope: ``"global"`` (one threshold over all layers) or ``"layerwise"``.
        output_fraction: rate of the last prunable layer (``None``: ``prune_fraction / 2``, the
            paper's; pass ``prune_fraction`` for open_lth's uniform global pruning).
        layers: regular expressions of the layers to prune (``None``: every Conv/Linear).
        exclude: regular expressions of layers not to prune.
        structured: prune whole output channels by norm and remove them (channel surgery).
        norm: channel score of the structured variant, ``"l1"`` or ``"l2"``.
        controls: any of ``"reinit"`` and ``"random_masks"`` (unstructured only), per round.
        directory: where the rewind checkpoint, the run records and the settings go.
        seed: seed of the initialisation, data order and controls.

    Returns:
        a :class:`TicketResult`.

    Raises:
        ValueError: a bad argument (before anything trains; the message names it), a model
            without prunable layers or a pattern that matches nothing, a ``rewind_to`` beyond
            round 0's length (raised by round 0's fit), or a ``directory`` holding a search with
            other settings.
    """
    patterns("layers", layers), patterns("exclude", exclude)  # checked here; stored as given
    settings = {
        "rounds": integer("rounds", rounds, minimum=1),
        "prune_fraction": fraction("prune_fraction", prune_fraction),
        "rewind_to": check_rewind_to(rewind_to),
        "scope": one_of("scope", scope, SCOPES),
        "output_fraction": fraction("output_fraction", output_fraction, allow_none=True),
        "layers": layers, "exclude": exclude,
        "structured": boolean("structured", structured),
        "norm": one_of("norm", norm, NORMS),
        "controls": list(controls) if not isinstance(controls, str) else [controls],
        "seed": integer("seed", seed),
    }
    for c in settings["controls"]:
        one_of("controls", c, CONTROLS)
    if structured and "random_masks" in settings["controls"]:
        raise ValueError("`controls` 'random_masks' is for unstructured tickets; use controls=('reinit',)")
    q = settings["output_fraction"] if output_fraction is not None else settings["prune_fraction"] / 2
    directory = Path(directory)
    seed_everything(seed, verbose=False)
    probe = model_fn()
    weights = prunable_weights(probe, layers, exclude)  # errors before anything trains
    output_layer = list(weights)[-1]
    full = sum(w.numel() for w in weights.values())
    example = _example_input(probe, datamodule) if structured else None
    if structured:
        prune_channels(probe, example, settings["prune_fraction"], None, scope, norm)  # traceable, removable?
    manifest = directory / _MANIFEST
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        for key, value in json.loads(json.dumps(settings)).items():
            if saved.get(key) != value:
                raise ValueError(
                    f"`{key}`={value!r} but the search in {str(directory)!r} was started with {saved.get(key)!r}; "
                    "resume with the same settings or use another `directory`"
                )
    directory.mkdir(parents=True, exist_ok=True)
    rewind_path = directory / "rewind.ckpt"
    result = TicketResult()
    masks, kept = ones_masks(weights), {}
    previous: dict[str, Any] | None = None
    result_steps: int | None = None
    for rnd in range(settings["rounds"] + 1):
        if previous is not None:  # prune the ticket trained in the previous round
            trained = model_fn()
            if structured:
                apply_kept(trained, kept_from_lists(kept))
            trained.load_state_dict(previous["state_dict"])
            if structured:
                kept = kept_to_lists(prune_channels(trained, example, settings["prune_fraction"],
                                                    kept_from_lists(kept), scope, norm))
            else:
                masks = magnitude_masks(prunable_weights(trained, layers, exclude), settings["prune_fraction"],
                                        masks, scope, output_layer, q)
        kinds = ["ticket"] + ([k for k in CONTROLS if k in settings["controls"]] if rnd > 0 else [])
        for kind in kinds:
            run = TicketRun(rnd, kind, seed, directory)
            record_path = directory / f"{run.name}.pt"
            if record_path.exists():
                record = torch.load(record_path, weights_only=False)
            else:
                if rnd > 0 and not rewind_path.exists():
                    raise ValueError(f"the rewind checkpoint {str(rewind_path)!r} is missing; start a new `directory`")
                run_masks = masks
                if kind == "random_masks":
                    gen = torch.Generator().manual_seed(seed + 20_000 + rnd)
                    run_masks = random_masks({n: m.cpu() for n, m in masks.items()}, gen)
                record = _train(model_fn, trainer_fn, datamodule, run, None if structured else run_masks, kept,
                                layers, exclude, settings["rewind_to"], rewind_path, full)
                if rnd == 0:  # before the first record: a record never exists without its settings
                    manifest.write_text(json.dumps(settings, indent=1))
                _save(record, record_path)
            if rnd > 0 and record.get("steps") != result_steps:
                rank_zero_warn(f"find_ticket: {run.name} ended at optimizer step {record.get('steps')}, round 0 at "
                               f"{result_steps}; `trainer_fn` should give every run the same length")
            result_steps = record.get("steps") if rnd == 0 else result_steps
            result.runs.append({k: record[k] for k in ("round", "kind", "remaining", "params", "metrics")})
            if kind == "ticket":
                previous = record
                masks = record["masks"] if record["masks"] is not None else masks
                kept = record["kept"]
    result.masks = None if structured else previous["masks"]
    result.kept, result.state_dict = previous["kept"], previous["state_dict"]
    return result


def _train(
    model_fn: Callable[[], LightningModule],
    trainer_fn: Callable[[TicketRun], Trainer],
    datamodule: LightningDataModule | None,
    run: TicketRun,
    masks: dict[str, torch.Tensor] | None,
    kept: dict[str, Any],
    layers: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    rewind_step: int,
    rewind_path: Path,
    full: int,
) -> dict[str, Any]:
    """One fit of the search; returns its record."""
    seed_everything(run.seed, verbose=False)
    model = model_fn()  # the same initialisation every run (overwritten by the rewind point after round 0)
    seed_everything(run.seed, workers=True, verbose=False)
    trainer = trainer_fn(run)
    if any(isinstance(cb, LotteryTicket) for cb in trainer.callbacks):
        raise ValueError("`trainer_fn` must not add a LotteryTicket callback; find_ticket adds its own")
    cb = LotteryTicket(
        masks=masks, kept=kept, layers=layers, exclude=exclude, rewind_to=rewind_step,
        rewind_path=rewind_path if run.round == 0 else None,
        reinit_seed=run.seed + 10_000 + run.round if run.kind == "reinit" else None, round_index=run.round,
    )
    trainer.callbacks.append(cb)
    with warnings.catch_warnings():
        # starting at the rewind step restarts the epoch's data loader (expected, documented)
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(rewind_path) if run.round > 0 else None)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()  # one W&B run per fit
    final_masks = cb.holder.masks if cb.holder is not None else None
    return {
        "round": run.round,
        "kind": run.kind,
        "steps": int(trainer.global_step),
        "remaining": (remaining(final_masks)["total"] if final_masks is not None
                      else sum(w.numel() for w in prunable_weights(model, layers, exclude).values()) / full),
        "params": parameter_count(model),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1},
        "masks": {n: m.cpu() for n, m in final_masks.items()} if final_masks is not None else None,
        "kept": kept_to_lists(cb.kept),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
