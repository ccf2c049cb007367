"""LotteryTicket + find_ticket through real Trainers: masks hold, rewinding restores weights,
optimizer and schedule state, controls, logging, kill-and-resume, bad input."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from examples.tiny import RandomClassificationData, TinyClassifier, TinyConvNet
from pl_optim.callbacks import DecoupledWeightDecay, LotteryTicket, OneCycle, find_ticket
from pl_optim.lottery import magnitude_masks, prunable_weights

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False, num_sanity_val_steps=0)


def sgd_model() -> TinyClassifier:
    return TinyClassifier(optimizer="sgd", lr=0.1, momentum=0.9)


def data() -> RandomClassificationData:
    return RandomClassificationData(n=64, batch_size=16)  # 4 batches an epoch


def trainer_fn(extra=None, epochs: int = 2, **kw):
    def make(run):
        cbs = [OneCycle(max_lr=0.2), DecoupledWeightDecay(0.05)] + (extra(run) if extra else [])
        return Trainer(max_epochs=epochs, callbacks=cbs, default_root_dir=str(run.directory), **{**QUIET, **kw})
    return make


class Probe(Callback):
    """Before every batch and at the end: the largest |pruned weight|; at the first batch: weights and lr."""

    def __init__(self, masks=None):
        self.masks, self.pruned_max, self.first = masks, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            opt = trainer.optimizers[0]
            self.first = {"lr": opt.param_groups[0]["lr"], "step": trainer.global_step,
                          "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                          "state": {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                                    for p, s in opt.state.items()}}
        self._check(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._check(pl_module)

    def _check(self, pl_module):
        if self.masks:
            w = prunable_weights(pl_module)
            self.pruned_max.append(max(float(w[k].detach()[~m].abs().max()) for k, m in self.masks.items()))


def test_callback_holds_masks_through_momentum_decay_and_one_cycle():
    model = sgd_model()
    masks = magnitude_masks({k: v.detach() for k, v in prunable_weights(model).items()}, 0.7)
    probe = Probe(masks)
    Trainer(max_epochs=3, callbacks=[OneCycle(max_lr=0.3), DecoupledWeightDecay(0.1), LotteryTicket(masks=masks), probe],
            **QUIET).fit(model, data())
    assert len(probe.pruned_max) == 13 and max(probe.pruned_max) == 0.0
    assert all(float(w.detach()[m].abs().min()) > 0 for w, m in
               zip(prunable_weights(model).values(), masks.values()))


def test_rounds_rewind_weights_optimizer_and_schedules(tmp_path):
    probes = {}

    def extra(run):
        probes[run.name] = Probe()
        return [probes[run.name]]

    res = find_ticket(sgd_model, trainer_fn(extra), data(), rounds=2, prune_fraction=0.5, rewind_to=3,
                      controls=("reinit", "random_masks"), directory=tmp_path, output_fraction=0.5)
    assert [(r["round"], r["kind"]) for r in res.runs] == [
        (0, "ticket"), (1, "ticket"), (1, "reinit"), (1, "random_masks"),
        (2, "ticket"), (2, "reinit"), (2, "random_masks")]
    total = 8 * 16 + 16 * 3
    kept1 = total - (-(-total // 2))
    assert res.runs[1]["remaining"] == pytest.approx(kept1 / total)
    assert res.runs[4]["remaining"] == pytest.approx((kept1 - (-(-kept1 // 2))) / total)
    rewind = torch.load(tmp_path / "rewind.ckpt", weights_only=False)
    assert rewind["global_step"] == 3
    r0, r1 = probes["round00-ticket"], probes["round01-ticket"]
    # the schedule continues from step 3 (OneCycle's lr at step 3 of round 0), weights = rewind ⊙ mask
    assert r1.first["step"] == 3
    assert r1.first["lr"] == pytest.approx(rewind["optimizer_states"][0]["param_groups"][0]["lr"])
    assert r1.first["lr"] != pytest.approx(r0.first["lr"])
    masks = torch.load(tmp_path / "round01-ticket.pt", weights_only=False)["masks"]
    for name, value in rewind["state_dict"].items():
        expected = value * masks[name] if name in masks else value
        assert torch.equal(r1.first["weights"][name], expected), name
    # momentum buffers come from the rewind point, masked; the re-init control starts without them
    assert r1.first["state"] and all("momentum_buffer" in s for s in r1.first["state"].values())
    assert not probes["round01-reinit"].first["state"]
    assert not torch.equal(probes["round01-reinit"].first["weights"]["net.0.weight"], r1.first["weights"]["net.0.weight"])
    rnd = torch.load(tmp_path / "round01-random_masks.pt", weights_only=False)["masks"]
    assert {k: int(m.sum()) for k, m in rnd.items()} == {k: int(m.sum()) for k, m in masks.items()}
    assert "ticket" in res.table() and "random_masks" in res.table()
    ticket = res.ticket(sgd_model)
    assert torch.equal(ticket.net[0].weight, res.state_dict["net.0.weight"])


class Kill(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step >= self.at_step:
            raise RuntimeError("killed")


SEARCH = dict(rounds=2, prune_fraction=0.4, rewind_to=2, controls=("reinit",))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return find_ticket(sgd_model, trainer_fn(), data(), directory=tmp_path_factory.mktemp("straight"), **SEARCH)


@pytest.mark.parametrize("run_name, at_step", [
    ("round00-ticket", 1),   # before the rewind checkpoint exists
    ("round00-ticket", 6),   # after it
    ("round01-ticket", 5),
    ("round01-reinit", 4),
])
def test_kill_and_resume_gives_the_same_masks_and_weights(tmp_path, uninterrupted, run_name, at_step):
    killer = trainer_fn(lambda run: [Kill(at_step)] if run.name == run_name else [])
    with pytest.raises(RuntimeError, match="killed"):
        find_ticket(sgd_model, killer, data(), directory=tmp_path, **SEARCH)
    res = find_ticket(sgd_model, trainer_fn(), data(), directory=tmp_path, **SEARCH)
    assert set(res.masks) == set(uninterrupted.masks)
    assert all(torch.equal(res.masks[k], uninterrupted.masks[k]) for k in res.masks)
    assert all(torch.equal(res.state_dict[k], uninterrupted.state_dict[k]) for k in res.state_dict)
    assert [r["metrics"]["val_acc"] for r in res.runs] == [r["metrics"]["val_acc"] for r in uninterrupted.runs]


def test_resume_with_other_settings_is_refused(tmp_path):
    find_ticket(sgd_model, trainer_fn(epochs=1), data(), directory=tmp_path, rounds=1, controls=())
    for kwargs, match in [({"prune_fraction": 0.3}, r"`prune_fraction`=0.3 but the search .* started with 0.2"),
                          ({"rounds": 2}, "`rounds`=2 but"), ({"rewind_to": 1}, "`rewind_to`=1 but")]:
        with pytest.raises(ValueError, match=match):
            find_ticket(sgd_model, trainer_fn(epochs=1), data(), directory=tmp_path, **{"rounds": 1, "controls": (), **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"prune_fraction": 0.0}, r"`prune_fraction` must be in \(0, 1\), got 0.0"),
    ({"prune_fraction": 1.2}, r"`prune_fraction` must be in \(0, 1\), got 1.2"),
    ({"rounds": 0}, "`rounds` must be an integer >= 1, got 0"),
    ({"rewind_to": -3}, "`rewind_to` must be 'init' or an optimizer step >= 0, got -3"),
    ({"rewind_to": "start"}, "`rewind_to` must be 'init'"),
    ({"rewind_to": 500}, "`rewind_to`=500 is beyond the first round's length of 8 optimizer steps"),
    ({"layers": "conv"}, "`layers` pattern 'conv' matches no Conv/Linear layer"),
    ({"scope": "local"}, "`scope` must be one of"),
    ({"controls": ("shuffle",)}, "`controls` must be one of"),
    ({"structured": True, "controls": ("random_masks",)}, "'random_masks' is for unstructured"),
])
def test_bad_arguments_name_the_value_and_leave_the_model_untouched(tmp_path, kwargs, match):
    built = []

    def model_fn():
        built.append(sgd_model())
        built[-1].before = {k: v.clone() for k, v in built[-1].state_dict().items()}
        return built[-1]

    with pytest.raises(ValueError, match=match):
        find_ticket(model_fn, trainer_fn(), data(), directory=tmp_path / "s", **kwargs)
    for m in built:
        assert all(torch.equal(v, m.before[k]) for k, v in m.state_dict().items())
    assert not (tmp_path / "s" / "round00-ticket.pt").exists()


def test_model_without_prunable_layers_is_refused(tmp_path):
    from torch import nn

    class NoLayers(TinyClassifier):
        def build_net(self):
            return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(8))

    with pytest.raises(ValueError, match="no prunable layers"):
        find_ticket(NoLayers, trainer_fn(), data(), directory=tmp_path)
    with pytest.raises(ValueError, match="no prunable layers"):
        Trainer(max_steps=1, callbacks=[LotteryTicket()], **QUIET).fit(NoLayers(), data())


def test_callback_refuses_masks_that_do_not_fit_and_leaves_weights():
    model = sgd_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"net.0.weight": torch.zeros(3, 3, dtype=torch.bool), "net.2.weight": torch.zeros(3, 16, dtype=torch.bool)}
    with pytest.raises(ValueError, match="mask of 'net.0.weight' has shape"):
        Trainer(max_steps=2, callbacks=[LotteryTicket(masks=bad)], **QUIET).fit(model, data())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_every_logger_gets_sparsity_and_wandb_one_run_per_round(tmp_path):
    seen = []

    class Who(Callback):
        def on_train_start(self, trainer, pl_module):
            exp = trainer.loggers[1].experiment
            seen.append((exp.id, exp.group, exp.name))

    def make(run):
        from lightning.pytorch.loggers import WandbLogger
        loggers = [CSVLogger(tmp_path / "csv", name=run.name),
                   WandbLogger(project="lottery-test", group="search-1", name=run.name, save_dir=str(tmp_path), offline=True)]
        return Trainer(max_epochs=1, callbacks=[Who()], **{**QUIET, "logger": loggers})

    res = find_ticket(sgd_model, make, data(), rounds=1, controls=("reinit",), directory=tmp_path / "s")
    assert len(seen) == 3 and len({s[0] for s in seen}) == 3 and {s[1] for s in seen} == {"search-1"}
    assert [s[2] for s in seen] == ["round00-ticket", "round01-ticket", "round01-reinit"]
    for run in res.runs:
        name = f"round{run['round']:02d}-{run['kind']}"
        with open(tmp_path / "csv" / name / "version_0" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        logged = [float(r["lottery/remaining"]) for r in rows if r.get("lottery/remaining")]
        assert logged == [pytest.approx(run["remaining"])] and any(r.get("val_acc") for r in rows)
    assert res.runs[1]["remaining"] < 1.0


def test_structured_tickets_are_smaller_and_keep_optimizer_state_in_sync(tmp_path):
    def model_fn():
        return TinyConvNet(channels=(8, 8), optimizer="adam", lr=0.01)

    probes = {}

    def extra(run):
        probes[run.name] = Probe()
        return [probes[run.name]]

    dm = RandomClassificationData(n=64, shape=(1, 8, 8), batch_size=16)
    res = find_ticket(model_fn, trainer_fn(extra), dm, rounds=2, prune_fraction=0.5, rewind_to=3, structured=True,
                      scope="layerwise", controls=("reinit",), directory=tmp_path)
    params = [r["params"] for r in res.runs if r["kind"] == "ticket"]
    assert params[0] > params[1] > params[2]
    assert res.runs[-2]["remaining"] < 0.2
    ticket = res.ticket(model_fn)
    assert ticket.net[0][0].out_channels == 2 and ticket.net[1][0].out_channels == 2
    assert sum(p.numel() for p in ticket.parameters()) == params[2]
    # round 1 starts from the rewind point sliced to the kept channels: weights and Adam moments
    rewind = torch.load(tmp_path / "rewind.ckpt", weights_only=False)
    kept = res.runs and torch.load(tmp_path / "round01-ticket.pt", weights_only=False)["kept"]
    out = torch.tensor(kept["net.0.0"]["out"])
    first = probes["round01-ticket"].first
    assert torch.equal(first["weights"]["net.0.0.weight"], rewind["state_dict"]["net.0.0.weight"][out])
    full_avg = rewind["optimizer_states"][0]["state"][0]["exp_avg"]
    small_avg = next(s["exp_avg"] for s in first["state"].values() if s["exp_avg"].shape == first["weights"]["net.0.0.weight"].shape)
    assert torch.equal(small_avg, full_avg[out])


def test_checkpoint_inside_a_round_resumes_with_its_masks_and_refuses_others(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = sgd_model()
    masks = magnitude_masks({k: v.detach() for k, v in prunable_weights(model).items()}, 0.6)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    Trainer(max_steps=3, callbacks=[LotteryTicket(masks=masks), ckpt], **{**QUIET, "enable_checkpointing": True}
            ).fit(model, data())
    path = next(tmp_path.glob("*.ckpt"))
    probe = Probe(masks)
    resumed = LotteryTicket()  # masks from the checkpoint
    Trainer(max_steps=6, callbacks=[resumed, probe], **QUIET).fit(sgd_model(), data(), ckpt_path=str(path))
    assert all(torch.equal(resumed.holder.masks[k].cpu(), masks[k]) for k in masks) and max(probe.pruned_max) == 0.0
    other = {k: torch.ones_like(m) for k, m in masks.items()}
    with pytest.raises(ValueError, match="masks differ from the `masks` given"):
        Trainer(max_steps=6, callbacks=[LotteryTicket(masks=other)], **QUIET).fit(sgd_model(), data(), ckpt_path=str(path))


def test_runs_of_different_length_warn(tmp_path):
    def make(run):
        return Trainer(max_epochs=1 if run.round == 0 else 2, **QUIET)

    with pytest.warns(UserWarning, match="should give every run the same length"):
        find_ticket(sgd_model, make, data(), rounds=1, controls=(), directory=tmp_path)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_result(tmp_path, uninterrupted):
    """A real SIGKILL of a child process running the search, right after round 0 finished (inside round 1)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (tmp_path / "round00-ticket.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (tmp_path / "round02-ticket.pt").exists()  # killed inside round 1
    res = find_ticket(sgd_model, trainer_fn(), data(), directory=tmp_path, **SEARCH)
    assert all(torch.equal(res.masks[k], uninterrupted.masks[k]) for k in res.masks)
    assert all(torch.equal(res.state_dict[k], uninterrupted.state_dict[k]) for k in res.state_dict)


if __name__ == "__main__":  # the child of the SIGKILL test
    import sys

    from lightning.pytorch import seed_everything

    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    find_ticket(sgd_model, trainer_fn(), data(), directory=sys.argv[1], **SEARCH)
