"""RecipeChecks, DataPreview and PredictionDynamics through a real Trainer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from examples.models import DigitsConvNet
from examples.tiny import RandomClassificationData, TinyClassifier, TinyConvNet
from pl_optim.callbacks import DataPreview, PredictionDynamics, RecipeChecks

IMAGES = dict(shape=(1, 8, 8), batch_size=64)
TINY_OPTIONS = {"overfit_batch": {"steps": 60}}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit(trainer_kwargs, callbacks, model=None, data=None, **kw) -> tuple[pl.Trainer, torch.nn.Module]:
    pl.seed_everything(0, verbose=False)
    model = model or TinyConvNet(num_classes=3)
    trainer = pl.Trainer(**{**trainer_kwargs, "max_steps": 4, "limit_val_batches": 0, **kw}, callbacks=callbacks)
    trainer.fit(model, datamodule=data or RandomClassificationData(**IMAGES))
    return trainer, model


class ManualModule(TinyConvNet):
    def __init__(self) -> None:
        super().__init__(num_classes=3)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize(
    "kw,model",
    [
        ({}, None),
        ({"accumulate_grad_batches": 2}, None),
        ({"precision": "bf16-mixed"}, None),
        ({}, "manual"),
    ],
    ids=["plain", "accumulation", "bf16-mixed", "manual-optimization"],
)
def test_training_with_the_checks_is_bit_identical_to_training_without(trainer_kwargs, kw, model):
    def make():
        pl.seed_everything(0, verbose=False)
        return ManualModule() if model == "manual" else TinyConvNet(num_classes=3)

    _, plain = fit(trainer_kwargs, [], make(), **kw)
    cb = RecipeChecks(options=TINY_OPTIONS)
    trainer, checked = fit(trainer_kwargs, [cb], make(), **kw)
    assert cb.report is not None and len(cb.report.results) == 7
    a, b = weights(plain), weights(checked)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainer.global_step == 4


def test_prints_one_checklist_table_and_logs_every_value(trainer_kwargs, tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        fit(trainer_kwargs, [RecipeChecks(options=TINY_OPTIONS)], logger=logger)
    text = caplog.text
    assert "RecipeChecks on the first training batch" in text
    for name in ("init_loss", "final_bias", "input_baseline", "overfit_batch", "batch_independence",
                 "gradient_flow", "activations"):
        assert f"] {name}" in text
    assert "7 passed, 0 warned, 0 failed, 0 skipped" in text
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "recipe/init_loss" in header and "recipe/overfit_batch_status" in header


class RecordingWandb(WandbLogger):
    """lightning's WandbLogger with the calls that would reach wandb recorded instead (no wandb run
    is started: Trainer.setup touches ``logger.experiment``)."""

    def __init__(self) -> None:
        super().__init__(offline=True)
        self.tables, self.images, self.metrics = [], [], []

    @property
    def experiment(self):
        return SimpleNamespace(id="recorded")

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images))


def test_wandb_gets_a_table_and_the_data_preview(trainer_kwargs):
    logger = RecordingWandb()
    fit(trainer_kwargs, [RecipeChecks(options=TINY_OPTIONS), DataPreview()], logger=logger)
    (key, columns, rows), = logger.tables
    assert key == "recipe_checks" and columns == ["check", "status", "value", "expected", "fix to try"]
    assert [r[0] for r in rows][:2] == ["init_loss", "final_bias"] and all(r[1] == "PASS" for r in rows)
    assert logger.images and logger.images[0][0] == "data_preview"


def test_raise_on_failure_stops_before_the_first_step(trainer_kwargs):
    class Softmaxed(TinyConvNet):
        def forward(self, x):
            return super().forward(x).softmax(1)

    model = Softmaxed(num_classes=3)
    before = weights(model)
    with pytest.raises(RuntimeError, match=r"RecipeChecks: failed overfit_batch \(the outputs are already probabilities"):
        fit(trainer_kwargs, [RecipeChecks(checks=["init_loss", "overfit_batch"], raise_on_failure=True)], model)
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())


def test_resumed_run_does_not_check_again(trainer_kwargs, tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit({**trainer_kwargs, "enable_checkpointing": True}, [ckpt], max_steps=2)
    cb = RecipeChecks(checks=["init_loss"])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**{**trainer_kwargs, "max_steps": 4, "limit_val_batches": 0}, callbacks=[cb])
    trainer.fit(TinyConvNet(num_classes=3), datamodule=RandomClassificationData(**IMAGES), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cb.report is None


def test_data_preview_and_prediction_dynamics_pngs(trainer_kwargs, tmp_path):
    preview, dynamics = DataPreview(num_samples=8), PredictionDynamics(num_samples=6)
    trainer, _ = fit(trainer_kwargs, [preview, dynamics], max_steps=-1, max_epochs=2, limit_train_batches=2)
    root = Path(trainer.default_root_dir) / "recipe"
    assert preview.saved == root / "data_preview.png" and preview.saved.stat().st_size > 1000
    assert sorted(p.name for p in root.iterdir()) == [
        "data_preview.png", "prediction_dynamics.png", "predictions_epoch000.png", "predictions_epoch001.png"]
    assert dynamics.epochs == [0, 1] and len(dynamics.history) == 2 and len(dynamics.history[0]) == 6
    assert all(0.0 <= p <= 1.0 for p in dynamics.history[1])
    state = dynamics.state_dict()
    again = PredictionDynamics()
    again.load_state_dict(json.loads(json.dumps(state)))  # plain numbers
    assert again.history == dynamics.history and again.epochs == [0, 1]


def test_data_preview_of_non_image_inputs_is_a_heat_map(trainer_kwargs):
    preview = DataPreview()
    fit(trainer_kwargs, [preview], TinyClassifier(), RandomClassificationData(batch_size=16))
    assert preview.saved is not None and preview.saved.exists()


def test_a_batch_without_tensor_inputs_is_refused_clearly(trainer_kwargs):
    class Strings(TinyClassifier):
        def train_dataloader(self):
            return DataLoader([{"text": "a b", "label": 0}] * 8, batch_size=4)

    with pytest.raises(ValueError, match=r"cannot find the inputs and targets in a batch with keys \['label', 'text'\]"):
        pl.Trainer(**{**trainer_kwargs, "max_steps": 1}, callbacks=[RecipeChecks()]).fit(Strings())


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (RecipeChecks, {"loss": "hinge"}, r"`loss` must be one of .*got 'hinge'"),
        (RecipeChecks, {"loss": lambda o, t: o.sum()}, r"cannot tell which task the loss '<lambda>'"),
        (RecipeChecks, {"checks": ["overfit"]}, r"`checks` must name recipe checks among .*got \['overfit'\]"),
        (RecipeChecks, {"checks": []}, r"`checks` must name recipe checks among .*got \[\]"),
        (RecipeChecks, {"options": {"overfitt": {}}}, r"unknown recipe check 'overfitt'; available: \['init_loss'"),
        (RecipeChecks, {"options": {"overfit_batch": {"threshold": 0}}}, r"`threshold` must be a positive finite number, got 0"),
        (RecipeChecks, {"options": {"init_loss": {"tolerance": -1.0}}}, r"`tolerance` must be a positive finite number, got -1.0"),
        (RecipeChecks, {"options": {"overfit_batch": {"stepz": 5}}}, r"`options\['overfit_batch'\]` has unknown keys \['stepz'\]"),
        (RecipeChecks, {"optimizer": 0.0}, r"`optimizer` must be a positive finite number, got 0.0"),
        (RecipeChecks, {"raise_on_failure": "yes"}, r"`raise_on_failure` must be True or False, got 'yes'"),
        (DataPreview, {"num_samples": 0}, r"`num_samples` must be an integer >= 1, got 0"),
        (DataPreview, {"filename": "x.jpg"}, r"`filename` a .png name, got 'recipe', 'x.jpg'"),
        (PredictionDynamics, {"every_n_epochs": 0}, r"`every_n_epochs` must be an integer >= 1, got 0"),
        (PredictionDynamics, {"task": "binary"}, r"`task` must be one of \('classification', 'regression'\), got 'binary'"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_digits_convnet_passes_through_the_trainer(trainer_kwargs):
    from examples.data import DigitsDataModule

    cb = RecipeChecks()
    fit(trainer_kwargs, [cb], DigitsConvNet(channels=(16, 32, 32)), DigitsDataModule(batch_size=64), max_steps=1)
    assert cb.report.not_passed == [], cb.report.table()


def test_demo_config_prints_a_checklist(tmp_path, caplog):
    from examples.cli import main

    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        main(["fit", "--config", "examples/configs/digits_recipe.yaml", "--trainer.max_epochs=1",
              f"--trainer.default_root_dir={tmp_path}"])
    assert "7 passed, 0 warned, 0 failed, 0 skipped" in caplog.text
    assert (tmp_path / "recipe" / "data_preview.png").exists()
    assert (tmp_path / "recipe" / "prediction_dynamics.png").exists()


class TwoOptimizers(TinyConvNet):
    """Head and body with their own optimizers (manual optimization): no parameter is missing."""

    def __init__(self) -> None:
        super().__init__(num_classes=3)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[:-1].parameters()), torch.optim.SGD(self.net[-1].parameters(), lr=0.1)]


def test_gradient_flow_counts_every_optimizer(trainer_kwargs):
    cb = RecipeChecks(checks=["gradient_flow"])
    fit(trainer_kwargs, [cb], TwoOptimizers(), max_steps=2)
    assert cb.report["gradient_flow"].status == "pass", cb.report.table()
