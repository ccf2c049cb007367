"""PredictionDynamics: the predictions on one fixed batch after every epoch, as PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from pl_optim import checks
from pl_optim.callbacks.data_preview import output_path
from pl_optim.recipe import split_batch
from pl_optim.recipe._setup import isolated
from pl_optim.recipe.plots import is_image_batch, save_batch_preview, save_prediction_dynamics


class PredictionDynamics(Callback):
    """Karpathy's "visualize prediction dynamics": keep ``num_samples`` samples of the first
    training batch fixed, and after every ``every_n_epochs`` training epoch run the model on
    them (eval mode, no grad, RNG and train/eval flags restored) and save

    * ``predictions_epoch{N:03d}.png``: for image inputs, the grid titled
      ``"<predicted> p=<its probability>"``, green when right, red when wrong;
    * ``prediction_dynamics.png``: one line per sample, the probability of its true class
      (classification) or the prediction (regression: ``task="regression"``) against the epoch.

    Only rank 0 records and draws. The history (plain floats) is in the callback's checkpoint
    state, so a resumed run continues the curves.

    Args:
        num_samples: samples of the fixed batch (>= 1).
        every_n_epochs: record every this many epochs (>= 1).
        task: ``"classification"`` (softmax over dim 1) or ``"regression"`` (raw outputs, first column).
        dirpath: folder of the PNGs (relative: under ``trainer.default_root_dir``).
        input_key: where the inputs are in the batch.
        target_key: where the targets are.

    Raises:
        ValueError: a bad argument; at the first batch, a batch without tensor inputs/targets.

    Example::

        Trainer(max_epochs=5, callbacks=[PredictionDynamics(num_samples=16)])
    """

    def __init__(self, num_samples: int = 16, every_n_epochs: int = 1, task: str = "classification",
                 dirpath: str = "recipe", input_key: str | int | None = None, target_key: str | int | None = None) -> None:
        self.num_samples = checks.integer("num_samples", num_samples, minimum=1)
        self.every_n_epochs = checks.integer("every_n_epochs", every_n_epochs, minimum=1)
        self.task = checks.one_of("task", task, ("classification", "regression"))
        if not isinstance(dirpath, str):
            raise ValueError(f"`dirpath` must be a folder name, got {dirpath!r}")
        self.dirpath, self.input_key, self.target_key = dirpath, input_key, target_key
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.epochs: list[int] = []
        self.history: list[list[float]] = []
        self.saved: list[Path] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.batch is None and trainer.is_global_zero:
            x, y = split_batch(batch, self.input_key, self.target_key)
            self.batch = (x[: self.num_samples].detach().clone(), y[: self.num_samples].detach().clone())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.batch is None or not trainer.is_global_zero or (epoch + 1) % self.every_n_epochs:
            return
        x, y = self.batch
        with isolated(pl_module), torch.no_grad():
            pl_module.eval()
            out = pl_module(x).float()
        if self.task == "classification":
            probs = out.softmax(1)
            pred = probs.argmax(1)
            tracked = probs.gather(1, y.long().view(-1, 1)).squeeze(1)
            titles = [f"{int(k)} p={float(probs[i, k]):.2f}" for i, k in enumerate(pred)]
            colors = ["green" if int(k) == int(t) else "red" for k, t in zip(pred, y)]
        else:
            tracked = out.reshape(len(out), -1)[:, 0]
            titles = [f"{float(v):.3g} ({float(t):.3g})" for v, t in zip(tracked, y.reshape(len(y), -1)[:, 0])]
            colors = None
        self.epochs.append(epoch)
        self.history.append([float(v) for v in tracked])
        if is_image_batch(x):
            path = output_path(trainer, self.dirpath, f"predictions_epoch{epoch:03d}.png")
            if save_batch_preview(x, path, titles=titles, colors=colors, suptitle=f"epoch {epoch}") is not None:
                self.saved.append(path)
        ylabel = "p(true class)" if self.task == "classification" else "prediction"
        path = save_prediction_dynamics(self.history, self.epochs, output_path(trainer, self.dirpath, "prediction_dynamics.png"), ylabel)
        if path is not None and path not in self.saved:
            self.saved.append(path)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.saved:
            rank_zero_info(f"PredictionDynamics: {len(self.epochs)} epoch(s) on {self.num_samples} fixed samples; "
                           f"PNGs in {self.saved[-1].parent}")

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = [int(e) for e in state_dict.get("epochs", [])]
        self.history = [[float(v) for v in h] for h in state_dict.get("history", [])]
