"""The precision plugins under a Trainer: skips published and not counted, torch schedulers held,
scaler state resumed, NaN losses never applied, fused optimizers, bad input."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from examples.tiny import RandomClassificationData, TinyClassifier
from pl_optim.callbacks import Float8Training, LossScaledMixedPrecision, PureBF16, precision_plugin
from pl_optim.steps import StepLedger
from tests.callbacks._precision_common import InjectAtStep
from tests.helpers import InjectInfGrad

OURS = {
    "fp16": lambda **kw: LossScaledMixedPrecision("cpu", **kw),
    "pure-kahan": lambda **kw: PureBF16("kahan", **kw),
    "pure-stochastic": lambda **kw: PureBF16("stochastic", **kw),
}


class OneCycleLRModule(TinyClassifier):
    """A torch OneCycleLR returned from configure_optimizers (stepped by Lightning every batch)."""

    def __init__(self, total=10, fused=False, **kw):
        self.total, self.fused = total, fused
        super().__init__(**kw)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused or None)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Capture(Logger):
    name, version = "capture", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("name", list(OURS))
def test_skipped_steps_hold_torch_scheduler_global_step_and_are_published(trainer_kwargs, name):
    logger = Capture()
    plugin = OURS[name]()
    model = OneCycleLRModule(total=10)
    kw = {**trainer_kwargs, "logger": logger, "log_every_n_steps": 1}
    trainer = pl.Trainer(max_steps=10, limit_val_batches=0, plugins=[plugin], callbacks=[InjectInfGrad([2, 5])], **kw)
    trainer.fit(model, datamodule=RandomClassificationData())  # OneCycleLR raises if stepped > 10 times
    sched = trainer.lr_scheduler_configs[0].scheduler
    ledger = StepLedger.of(trainer.optimizers[0])
    assert (ledger.steps, ledger.skipped, trainer.global_step, sched.last_epoch) == (10, 2, 10, 10)
    assert type(sched) is torch.optim.lr_scheduler.OneCycleLR  # class restored at teardown
    assert plugin.skipped_steps == 2 and plugin.last_step_skipped is False
    assert float(trainer.callback_metrics["amp/skipped_steps"]) == 2.0
    skipped_logged = [r["amp/skipped_steps"] for r in logger.rows if "amp/skipped_steps" in r]
    assert skipped_logged[-1] == 2.0 and skipped_logged[0] == 0.0
    last = [r["amp/last_step_skipped"] for r in logger.rows if "amp/last_step_skipped" in r]
    assert last == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0] + [0.0] * 6  # batches 2 and 5 skipped
    if name == "fp16":
        scales = [r["amp/loss_scale"] for r in logger.rows if "amp/loss_scale" in r]
        assert scales[0] == 2.0**16 and scales[-1] == 2.0**14  # halved on each skip
        assert float(trainer.callback_metrics["amp/loss_scale"]) == 2.0**14


def test_hold_schedulers_opt_out_steps_on_skips(trainer_kwargs):
    trainer = pl.Trainer(max_steps=8, limit_val_batches=0, plugins=[LossScaledMixedPrecision("cpu", hold_schedulers=False)],
                         callbacks=[InjectInfGrad([2])], **trainer_kwargs)
    trainer.fit(OneCycleLRModule(total=20), datamodule=RandomClassificationData())
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 9  # 8 real steps + 1 skipped


def test_fused_adam_skips_without_being_called_and_clips(trainer_kwargs):
    norms = []

    class Norm(pl.Callback):  # at batch end the gradients are the unscaled, clipped ones the step used
        def on_train_batch_end(self, trainer, pl_module, *args):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer = pl.Trainer(max_steps=6, limit_val_batches=0, plugins=[LossScaledMixedPrecision("cpu")], gradient_clip_val=1e-3,
                         callbacks=[InjectInfGrad([1]), Norm()], **trainer_kwargs)
    model = OneCycleLRModule(total=6, fused=True)
    trainer.fit(model, datamodule=RandomClassificationData())
    ledger = StepLedger.of(trainer.optimizers[0])
    assert (ledger.steps, ledger.skipped) == (6, 1)
    assert int(trainer.optimizers[0].state[next(model.parameters())]["step"]) == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    finite = [n for n in norms if n == n and n != float("inf")]
    assert finite and max(finite) <= 1e-3 * 1.01  # unscaled, then clipped (MixedPrecision refuses fused + clipping)


def test_scaler_state_resumes_exactly(trainer_kwargs, tmp_path):
    kw = {**trainer_kwargs, "limit_val_batches": 0}

    def fit(epochs, ckpt=None):
        pl.seed_everything(0)
        plugin = LossScaledMixedPrecision("cpu", growth_interval=3)
        trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=4, plugins=[plugin], callbacks=[InjectAtStep(1)], **kw)
        model = TinyClassifier()
        trainer.fit(model, datamodule=RandomClassificationData(), ckpt_path=ckpt)
        return trainer, plugin, model

    trainer, plugin, _ = fit(1)
    trainer.save_checkpoint(tmp_path / "e1.ckpt")
    saved = torch.load(tmp_path / "e1.ckpt", weights_only=False)["LossScaledMixedPrecision"]
    assert saved["scaler"]["scale"] == 2.0**15 and saved["skipped_steps"] == 1
    _, straight, model = fit(3)
    _, resumed, model2 = fit(3, tmp_path / "e1.ckpt")
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    assert resumed.scaler.get_scale() == 2.0**15 * 2**3  # the skip halved it; 10 finite steps after: 3 growths
    assert resumed.skipped_steps == straight.skipped_steps == 1
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


class NaNLoss(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 1 else loss


@pytest.mark.parametrize("name", [*OURS, "pure-none"])
def test_nan_loss_is_skipped_and_weights_stay_finite(trainer_kwargs, name):
    plugin = PureBF16("none") if name == "pure-none" else OURS[name]()
    snapshots = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append([p.detach().clone() for p in pl_module.parameters()])

    model = NaNLoss()
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, plugins=[plugin], callbacks=[Snap()], **trainer_kwargs)
    trainer.fit(model, datamodule=RandomClassificationData())
    assert plugin.skipped_steps == 1 and trainer.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # batch 1 changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pure_bf16_keeps_quantiser_params_fp32_and_checkpoints_buffers(trainer_kwargs, tmp_path):
    from examples.tiny import TinyConvNet
    from pl_optim.callbacks import SelfCompression
    from pl_optim.precision import STATE_KEY

    model = TinyConvNet(channels=(4, 4))
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, plugins=[PureBF16("kahan")], callbacks=[SelfCompression(1.0)],
                         **trainer_kwargs)
    trainer.fit(model, datamodule=RandomClassificationData(n=32, shape=(1, 8, 8), batch_size=8))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith((".bits", ".exponent"))} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith((".bits", ".exponent"))} == {torch.bfloat16}
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    states = torch.load(tmp_path / "c.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    assert sum(STATE_KEY in s for s in states.values()) == sum(d == torch.bfloat16 for d in dtypes.values())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: precision_plugin("fp17"), r"`precision` must be one of \('16-mixed', 'bf16-pure', 'fp8', '32-true', 'bf16-mixed', 'bf16-true'\), got 'fp17'"),
        (lambda: precision_plugin("bf16-pure", scaler=torch.amp.GradScaler("cpu")), r"a `scaler` \(loss scaling\) is only for fp16: precision 'bf16-pure'"),
        (lambda: precision_plugin("bf16-mixed", scaler=torch.amp.GradScaler("cpu")), r"precision 'bf16-mixed' does not overflow"),
        (lambda: PureBF16("kahn"), r"`compensation` must be one of \('kahan', 'stochastic', 'none'\), got 'kahn'"),
        (lambda: LossScaledMixedPrecision("tpu"), r"`device` must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
        (lambda: LossScaledMixedPrecision(backoff_factor=1.5), r"`backoff_factor` must be in \(0, 1\), got 1.5"),
        (lambda: LossScaledMixedPrecision(scaler="yes"), r"`scaler` must be a torch.amp.GradScaler or None, got 'yes'"),
        (lambda: Float8Training(recipe="e5m2"), r"`recipe` must be one of \('tensorwise', 'rowwise', 'rowwise_with_gw_hp'\), got 'e5m2'"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class LBFGSModule(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters())


@pytest.mark.parametrize("plugin", [lambda: LossScaledMixedPrecision("cpu"), lambda: PureBF16()])
def test_lbfgs_refused_at_setup(trainer_kwargs, plugin):
    trainer = pl.Trainer(max_steps=1, plugins=[plugin()], **trainer_kwargs)
    with pytest.raises(ValueError, match=r"does not support torch.optim.LBFGS .*supported: optimizers whose"):
        trainer.fit(LBFGSModule(), datamodule=RandomClassificationData())


def test_fp8_refused_on_cpu_with_device_and_layer_shapes(trainer_kwargs):
    trainer = pl.Trainer(max_steps=1, plugins=[Float8Training()], **trainer_kwargs)
    with pytest.raises(RuntimeError, match=r"CUDA device of compute capability >= 8.9; the model is on cpu.*"
                                           r"ineligible .*net.0 \[16 x 8\], net.2 \[3 x 16\]"):
        trainer.fit(TinyClassifier(), datamodule=RandomClassificationData())


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 training needs a CUDA GPU of compute capability >= 8.9 (run scripts/gpu_check.sh on one)",
)
def test_fp8_converts_eligible_linears_on_gpu(tmp_path):
    pytest.importorskip("torchao", reason="fp8 needs torchao: pip install 'pl-optim[fp8]'")
    model = TinyClassifier(features=32, hidden=64, num_classes=16)
    plugin = Float8Training()
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_steps=5, plugins=[plugin], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=RandomClassificationData(shape=(32,), num_classes=16))
    assert plugin.converted == ["net.0", "net.2"]
    assert StepLedger.of(trainer.optimizers[0]).steps == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fp16 GradScaler('cuda') path")
def test_fp16_on_cuda_skips_like_on_cpu(tmp_path):
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_steps=6, plugins=[LossScaledMixedPrecision()],
                         callbacks=[InjectInfGrad([2])], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(OneCycleLRModule(total=6), datamodule=RandomClassificationData())
    assert trainer.precision_plugin.device == "cuda" and trainer.global_step == 6
    assert StepLedger.of(trainer.optimizers[0]).skipped == 1


def test_fp8_refuses_an_old_gpu_naming_it(monkeypatch):
    from pl_optim.callbacks.precision_fp8 import eligible_linears, fp8_support

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    reason = fp8_support(torch.device("cuda", 0))
    assert reason == "fp8 training needs compute capability >= 8.9; NVIDIA A100 (cuda:0) has 8.0"
    assert eligible_linears(TinyClassifier(features=32, hidden=64, num_classes=3).net) == (["0"], ["2 [3 x 64]"])
