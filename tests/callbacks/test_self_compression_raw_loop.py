"""The whole method from a raw PyTorch loop with only ``pl_optim.compression`` equals SelfCompression:
same weights, bits, exponents, removed channels and optimizer state, bit for bit."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from examples.tiny import RandomClassificationData, TinyConvNet
from pl_optim.callbacks import SelfCompression
from pl_optim.compression import (
    ChannelRemoval,
    OutputPositions,
    add_size_grad,
    attach_quantizers,
    clean_gradients,
    move_to_own_groups,
    quantizer_parameters,
    repair_nonfinite,
    snapshot,
)

GAMMA, COMPUTE, BITS_LR, EXP_LR, SHIFT = 20.0, 5.0, 0.2, 0.1, 0.05
EPOCHS, FREEZE_AT = 3, 0.75


def _data():
    return RandomClassificationData(n=64, shape=(1, 8, 8), batch_size=8)


def _raw_loop(column_cost: float) -> tuple[TinyConvNet, torch.optim.Optimizer, ChannelRemoval]:
    pl.seed_everything(0)
    model = TinyConvNet(optimizer="adam", lr=0.05)
    attach_quantizers(model, init_bits=2)
    opt = model.configure_optimizers()  # the user's Adam(self.parameters())
    move_to_own_groups(opt, model, BITS_LR, EXP_LR)
    loader = _data().train_dataloader()
    steps, freeze = 0, -(-FREEZE_AT * EPOCHS * len(loader) // 1)
    recorder, removal = OutputPositions(model), None
    for _ in range(EPOCHS):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if removal is None:
                removal = ChannelRemoval(model, example_input=x, shift_decay=SHIFT)
            recorder.remove()
            frozen = steps >= freeze
            saved = snapshot(model)
            clean_gradients(model)
            if not frozen:
                add_size_grad(model, GAMMA, COMPUTE, recorder.positions, removal.graph, column_cost)
            opt.step()
            steps += 1
            if frozen:
                with torch.no_grad():
                    for p, old in zip(quantizer_parameters(model), saved):
                        p.copy_(old)
            repair_nonfinite(model, saved, [opt])
            removal.step([opt], step=steps)
    return model, opt, removal


@pytest.mark.parametrize("column_cost", [0.0, 2.0])
def test_raw_loop_equals_the_callback(trainer_kwargs, column_cost):
    raw, raw_opt, removal = _raw_loop(column_cost)

    pl.seed_everything(0)
    model = TinyConvNet(optimizer="adam", lr=0.05)
    cb = SelfCompression(GAMMA, init_bits=2, lr=BITS_LR, exponent_lr=EXP_LR, shift_decay=SHIFT,
                         compute_gamma=COMPUTE, freeze_at=FREEZE_AT, column_cost=column_cost)
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=[cb], **{**trainer_kwargs, "limit_val_batches": 0})
    trainer.fit(model, datamodule=_data())

    assert removal.events and removal.events == cb.removal.core.events  # channels were removed, at the same steps
    assert model.state_dict().keys() == raw.state_dict().keys()
    for key, value in raw.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    opt = trainer.optimizers[0]
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in raw_opt.param_groups]
    for p, q in zip(model.parameters(), raw.parameters()):
        for key, value in raw_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("name", ["ChannelRemoval", "OutputPositions", "quantizer_param_groups", "plain_state_dict",
                                  "restore_compressed", "shrink_to_state_dict", "compute_size_loss", "load_packed",
                                  "column_cost_loss"])
def test_the_core_api_is_public(name):
    import pl_optim.compression as core

    assert name in core.__all__ and callable(getattr(core, name))
