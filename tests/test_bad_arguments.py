"""Bad input, everywhere: one table of invalid arguments to every public callback and core function.

Each row: what is called, with which bad argument, the exception type, the argument's name as the
message must show it (in backticks) and the text that echoes the bad value. Nothing here trains; it
checks the contract that every user-facing argument is validated where it is given.
"""

from __future__ import annotations

import math

import pytest
import torch

from pl_optim import apply_weight_decay, checks, set_amsgrad
from pl_optim.callbacks import (
    AMSGradToggle,
    DecoupledWeightDecay,
    LossScaledMixedPrecision,
    LotteryTicket,
    OneCycle,
    ParamScheduler,
    PureBF16,
    SelfCompression,
    find_ticket,
)
from pl_optim.param_groups import GroupWriter
from pl_optim.plateau import Plateau
from pl_optim.schedules import (
    Combined,
    Constant,
    Cosine,
    Exponential,
    Linear,
    MultiStep,
    Polynomial,
    StepDecay,
    WarmRestarts,
    Warmup,
    one_cycle,
)
from pl_optim.weight_decay import DecoupledDecay, decay_coefficient

NAN, INF = math.nan, math.inf


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1)


def _call(fn, **kwargs):
    return lambda: fn(**kwargs)


C = Cosine(1.0, 0.0)

# (id, thunk, exception, argument name, echoed value)
ROWS = [
    # --- OneCycle --------------------------------------------------------------------------------
    ("oc-max_lr-str", _call(OneCycle, max_lr="fast"), ValueError, "max_lr", "'fast'"),
    ("oc-max_lr-empty", _call(OneCycle, max_lr=[]), ValueError, "max_lr", "[]"),
    ("oc-max_lr-neg", _call(OneCycle, max_lr=-1.0), ValueError, "max_lr", "-1.0"),
    ("oc-max_lr-nan", _call(OneCycle, max_lr=NAN), ValueError, "max_lr", "nan"),
    ("oc-max_lr-bool", _call(OneCycle, max_lr=True), ValueError, "max_lr", "True"),
    ("oc-max_lr-list-neg", _call(OneCycle, max_lr=[0.1, -0.1]), ValueError, "max_lr", "-0.1"),
    ("oc-total-0", _call(OneCycle, max_lr=0.1, total_steps=0), ValueError, "total_steps", "0"),
    ("oc-total-float", _call(OneCycle, max_lr=0.1, total_steps=2.5), ValueError, "total_steps", "2.5"),
    ("oc-total-bool", _call(OneCycle, max_lr=0.1, total_steps=True), ValueError, "total_steps", "True"),
    ("oc-total-list", _call(OneCycle, max_lr=0.1, total_steps=[5, 0]), ValueError, "total_steps[1]", "0"),
    ("oc-pct-0", _call(OneCycle, max_lr=0.1, pct_start=0.0), ValueError, "pct_start", "0.0"),
    ("oc-pct-1", _call(OneCycle, max_lr=0.1, pct_start=1), ValueError, "pct_start", "1"),
    ("oc-pct-nan", _call(OneCycle, max_lr=0.1, pct_start=NAN), ValueError, "pct_start", "nan"),
    ("oc-pct-str", _call(OneCycle, max_lr=0.1, pct_start="0.3"), ValueError, "pct_start", "'0.3'"),
    ("oc-anneal", _call(OneCycle, max_lr=0.1, anneal_strategy="cosine"), ValueError, "anneal_strategy", "'cosine'"),
    ("oc-anneal-int", _call(OneCycle, max_lr=0.1, anneal_strategy=1), ValueError, "anneal_strategy", "1"),
    ("oc-cycle-str", _call(OneCycle, max_lr=0.1, cycle_momentum="no"), ValueError, "cycle_momentum", "'no'"),
    ("oc-cycle-int", _call(OneCycle, max_lr=0.1, cycle_momentum=1), ValueError, "cycle_momentum", "1"),
    ("oc-cycle-none", _call(OneCycle, max_lr=0.1, cycle_momentum=None), ValueError, "cycle_momentum", "None"),
    ("oc-base-mom", _call(OneCycle, max_lr=0.1, base_momentum=-0.1), ValueError, "base_momentum", "-0.1"),
    ("oc-max-mom", _call(OneCycle, max_lr=0.1, max_momentum=1.0), ValueError, "max_momentum", "1.0"),
    ("oc-max-mom-list", _call(OneCycle, max_lr=0.1, max_momentum=[0.9, 1.5]), ValueError, "max_momentum", "1.5"),
    ("oc-div", _call(OneCycle, max_lr=0.1, div_factor=0.0), ValueError, "div_factor", "0.0"),
    ("oc-div-nan", _call(OneCycle, max_lr=0.1, div_factor=NAN), ValueError, "div_factor", "nan"),
    ("oc-final-div", _call(OneCycle, max_lr=0.1, final_div_factor=-1), ValueError, "final_div_factor", "-1"),
    ("oc-three", _call(OneCycle, max_lr=0.1, three_phase="yes"), ValueError, "three_phase", "'yes'"),
    ("oc-beta2-1", _call(OneCycle, max_lr=0.1, beta2=1.0), ValueError, "beta2", "1.0"),
    ("oc-beta2-neg", _call(OneCycle, max_lr=0.1, beta2=-0.1), ValueError, "beta2", "-0.1"),
    ("oc-beta2-str", _call(OneCycle, max_lr=0.1, beta2="0.99"), ValueError, "beta2", "'0.99'"),
    ("oc-opt-neg", _call(OneCycle, max_lr=0.1, optimizers=-1), ValueError, "optimizers", "-1"),
    ("oc-opt-str", _call(OneCycle, max_lr=0.1, optimizers="all"), ValueError, "optimizers", "'all'"),
    ("oc-opt-dup", _call(OneCycle, max_lr=0.1, optimizers=[0, 0]), ValueError, "optimizers", "[0, 0]"),
    ("oc-opt-empty", _call(OneCycle, max_lr=0.1, optimizers=[]), ValueError, "optimizers", "[]"),
    ("oc-opt-bool", _call(OneCycle, max_lr=0.1, optimizers=True), ValueError, "optimizers", "True"),
    ("oc-resume", _call(OneCycle, max_lr=0.1, on_resume="ckpt"), ValueError, "on_resume", "'ckpt'"),
    ("oc-resume-none", _call(OneCycle, max_lr=0.1, on_resume=None), ValueError, "on_resume", "None"),
    # --- ParamScheduler ------------------------------------------------------------------------
    ("ps-empty", _call(ParamScheduler, schedules={}), ValueError, "schedules", "{}"),
    ("ps-none", _call(ParamScheduler, schedules=None), ValueError, "schedules", "None"),
    ("ps-not-callable", _call(ParamScheduler, schedules={"lr": 3}), ValueError, "schedules['lr']", "3"),
    ("ps-key", _call(ParamScheduler, schedules={1: C}), ValueError, "schedules[1]", "Cosine"),
    ("ps-list-bad", _call(ParamScheduler, schedules={"lr": [C, "x"]}), ValueError, "schedules['lr']", "'x'"),
    ("ps-mult-str", _call(ParamScheduler, schedules={"lr": C}, multipliers="x"), ValueError, "multipliers", "'x'"),
    ("ps-mult-init", _call(ParamScheduler, schedules={"lr": C}, multipliers={"lr": "init"}), ValueError, "multipliers", "'init'"),
    ("ps-total", _call(ParamScheduler, schedules={"lr": C}, total_steps=-2), ValueError, "total_steps", "-2"),
    ("ps-opt", _call(ParamScheduler, schedules={"lr": C}, optimizers=[1.5]), ValueError, "optimizers", "[1.5]"),
    ("ps-resume", _call(ParamScheduler, schedules={"lr": C}, on_resume=1), ValueError, "on_resume", "1"),
    # --- DecoupledWeightDecay / DecoupledDecay / apply_weight_decay ---------------------------
    ("dwd-neg", _call(DecoupledWeightDecay, weight_decay=-0.1), ValueError, "weight_decay", "-0.1"),
    ("dwd-nan", _call(DecoupledWeightDecay, weight_decay=NAN), ValueError, "weight_decay", "nan"),
    ("dwd-inf", _call(DecoupledWeightDecay, weight_decay=INF), ValueError, "weight_decay", "inf"),
    ("dwd-str", _call(DecoupledWeightDecay, weight_decay="adamw"), ValueError, "weight_decay", "'adamw'"),
    ("dwd-bool", _call(DecoupledWeightDecay, weight_decay=True), ValueError, "weight_decay", "True"),
    ("dwd-mode", _call(DecoupledWeightDecay, weight_decay=0.1, mode="l1"), ValueError, "mode", "'l1'"),
    ("dwd-mode-none", _call(DecoupledWeightDecay, weight_decay=0.1, mode=None), ValueError, "mode", "None"),
    ("dwd-exclude-int", _call(DecoupledWeightDecay, weight_decay=0.1, exclude=3), ValueError, "exclude", "3"),
    ("dwd-exclude-list", _call(DecoupledWeightDecay, weight_decay=0.1, exclude=["bias", 1]), ValueError, "exclude", "1"),
    ("dwd-exclude-regex", _call(DecoupledWeightDecay, weight_decay=0.1, exclude="("), ValueError, "exclude", "'('"),
    ("dwd-exclude1d", _call(DecoupledWeightDecay, weight_decay=0.1, exclude_1d="no"), ValueError, "exclude_1d", "'no'"),
    ("dwd-lr_ref-0", _call(DecoupledWeightDecay, weight_decay=0.1, mode="lr_ratio", lr_ref=0), ValueError, "lr_ref", "0"),
    ("dwd-lr_ref-list", _call(DecoupledWeightDecay, weight_decay=0.1, lr_ref=[0.1, -1]), ValueError, "lr_ref", "-1"),
    ("dwd-lr_ref-str", _call(DecoupledWeightDecay, weight_decay=0.1, lr_ref="max"), ValueError, "lr_ref", "'max'"),
    ("dwd-foreach", _call(DecoupledWeightDecay, weight_decay=0.1, foreach="yes"), ValueError, "foreach", "'yes'"),
    ("dwd-log", _call(DecoupledWeightDecay, weight_decay=0.1, log=0), ValueError, "log", "0"),
    ("dd-neg", lambda: DecoupledDecay(_sgd(), -1.0), ValueError, "weight_decay", "-1.0"),
    ("dd-mode", lambda: DecoupledDecay(_sgd(), 0.1, mode="adam"), ValueError, "mode", "'adam'"),
    ("dd-not-opt", lambda: DecoupledDecay([1], 0.1), TypeError, "optimizer", "list"),
    ("awd-nan", lambda: apply_weight_decay([torch.ones(2)], NAN), ValueError, "coefficient", "nan"),
    ("awd-neg", lambda: apply_weight_decay([torch.ones(2)], -0.5), ValueError, "coefficient", "-0.5"),
    ("awd-big", lambda: apply_weight_decay([torch.ones(2)], 1.5), ValueError, "coefficient", "1.5"),
    ("awd-mode", lambda: apply_weight_decay([torch.ones(2)], 0.1, mode="x"), ValueError, "mode", "'x'"),
    ("awd-foreach", lambda: apply_weight_decay([torch.ones(2)], 0.1, foreach="x"), ValueError, "foreach", "'x'"),
    ("dc-lr", lambda: decay_coefficient("lr", 0.1, NAN), ValueError, "lr", "nan"),
    ("dc-wd", lambda: decay_coefficient("lr", -0.1, 0.1), ValueError, "weight_decay", "-0.1"),
    ("dc-ratio-ref", lambda: decay_coefficient("lr_ratio", 0.1, 0.1, None), ValueError, "lr_ref", "None"),
    # --- AMSGrad -------------------------------------------------------------------------------
    ("ams-empty", _call(AMSGradToggle, schedule={}), ValueError, "schedule", "{}"),
    ("ams-list", _call(AMSGradToggle, schedule=[True]), ValueError, "schedule", "[True]"),
    ("ams-key-neg", _call(AMSGradToggle, schedule={-1: True}), ValueError, "schedule key", "-1"),
    ("ams-key-float", _call(AMSGradToggle, schedule={1.5: True}), ValueError, "schedule key", "1.5"),
    ("ams-value", _call(AMSGradToggle, schedule={0: 1}), ValueError, "schedule[0]", "1"),
    ("ams-interval", _call(AMSGradToggle, schedule={0: True}, interval="batch"), ValueError, "interval", "'batch'"),
    ("ams-opt", _call(AMSGradToggle, schedule={0: True}, optimizers=-2), ValueError, "optimizers", "-2"),
    ("ams-log", _call(AMSGradToggle, schedule={0: True}, log="on"), ValueError, "log", "'on'"),
    ("set-ams-sgd", lambda: set_amsgrad(_sgd(), True), ValueError, "amsgrad", "SGD"),
    ("set-ams-flag", lambda: set_amsgrad(torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]), "yes"), ValueError, "enabled", "'yes'"),
    # --- SelfCompression -------------------------------------------------------------------------
    ("sc-gamma", _call(SelfCompression, gamma=-1.0), ValueError, "gamma", "-1.0"),
    ("sc-gamma-nan", _call(SelfCompression, gamma=NAN), ValueError, "gamma", "nan"),
    ("sc-gamma-str", _call(SelfCompression, gamma="0.3"), ValueError, "gamma", "'0.3'"),
    ("sc-init-bits", _call(SelfCompression, gamma=0.3, init_bits=0), ValueError, "init_bits", "0"),
    ("sc-exclude", _call(SelfCompression, gamma=0.3, exclude=[1]), ValueError, "exclude", "1"),
    ("sc-lr", _call(SelfCompression, gamma=0.3, lr=0.0), ValueError, "lr", "0.0"),
    ("sc-exp-lr", _call(SelfCompression, gamma=0.3, exponent_lr=-1), ValueError, "exponent_lr", "-1"),
    ("sc-remove", _call(SelfCompression, gamma=0.3, remove_channels="yes"), ValueError, "remove_channels", "'yes'"),
    ("sc-interval", _call(SelfCompression, gamma=0.3, removal_interval=0), ValueError, "removal_interval", "0"),
    ("sc-interval-float", _call(SelfCompression, gamma=0.3, removal_interval=1.5), ValueError, "removal_interval", "1.5"),
    ("sc-shift", _call(SelfCompression, gamma=0.3, shift_decay=-1e-3), ValueError, "shift_decay", "-0.001"),
    ("sc-freeze-0", _call(SelfCompression, gamma=0.3, freeze_at=0), ValueError, "freeze_at", "0"),
    ("sc-freeze-1", _call(SelfCompression, gamma=0.3, freeze_at=1.0), ValueError, "freeze_at", "1.0"),
    ("sc-compute", _call(SelfCompression, gamma=0.3, compute_gamma=-0.5), ValueError, "compute_gamma", "-0.5"),
    ("sc-column", _call(SelfCompression, gamma=0.3, column_cost=-1.0), ValueError, "column_cost", "-1.0"),
    ("sc-column-no-removal", _call(SelfCompression, gamma=0.3, column_cost=1.0, remove_channels=False), ValueError,
     "column_cost", "1.0"),
    ("sc-warmup-0", _call(SelfCompression, gamma=0.3, gamma_warmup=0.0), ValueError, "gamma_warmup", "0.0"),
    ("sc-warmup-str", _call(SelfCompression, gamma=0.3, gamma_warmup="0.1"), ValueError, "gamma_warmup", "'0.1'"),
    ("sc-integer-bits", _call(SelfCompression, gamma=0.3, integer_bits="yes"), ValueError, "integer_bits", "'yes'"),
    ("sc-integer-no-freeze", _call(SelfCompression, gamma=0.3, integer_bits=True, freeze_at=None), ValueError,
     "integer_bits", "None"),
    ("sc-warmup-freeze", _call(SelfCompression, gamma=0.3, gamma_warmup=0.9), ValueError, "gamma_warmup", "0.9"),
    # --- schedules -----------------------------------------------------------------------------
    ("cos-nan", lambda: Cosine(NAN, 0.0), ValueError, "start", "nan"),
    ("lin-str", lambda: Linear("a", 1.0), ValueError, "start", "'a'"),
    ("exp-zero", lambda: Exponential(0.0, 1.0), ValueError, "start", "0.0"),
    ("poly-power", lambda: Polynomial(1.0, 0.0, power=0), ValueError, "power", "0"),
    ("const-inf", lambda: Constant(INF), ValueError, "value", "inf"),
    ("step-size", lambda: StepDecay(1.0, 0, 0.5), ValueError, "step_size", "0"),
    ("multistep-order", lambda: MultiStep(1.0, [3, 2], 0.5), ValueError, "milestones", "[3, 2]"),
    ("restarts-mult", lambda: WarmRestarts(1.0, 0.0, 5, mult=0), ValueError, "mult", "0"),
    ("warmup-len", lambda: Warmup(C, -1), ValueError, "steps", "-1"),
    ("warmup-sched", lambda: Warmup("x", 5), ValueError, "schedule", "'x'"),
    ("combined-len", lambda: Combined([0.5], [C, C]), ValueError, "pcts", "1"),
    ("combined-sum", lambda: Combined([0.5, 0.6], [C, C]), ValueError, "pcts", "[0.5, 0.6]"),
    ("one-cycle-lr", lambda: one_cycle(-1.0), ValueError, "max_lr", "-1.0"),
    ("one-cycle-pct", lambda: one_cycle(0.1, pct_start=1.5), ValueError, "pct_start", "1.5"),
    ("writer-field", lambda: GroupWriter(_sgd(), {"betas": C}), ValueError, "betas", "SGD"),
    ("writer-mult-len", lambda: GroupWriter(_sgd(), {"lr": C}, {"lr": [1.0, 2.0]}), ValueError, "multipliers['lr']", "[1.0, 2.0]"),
    ("writer-mult-nan", lambda: GroupWriter(_sgd(), {"lr": C}, {"lr": [NAN]}), ValueError, "multipliers['lr']", "nan"),
    # --- precision plugins -----------------------------------------------------------------------
    ("fp16-device", _call(LossScaledMixedPrecision, device="tpu"), ValueError, "device", "'tpu'"),
    ("fp16-scale", _call(LossScaledMixedPrecision, init_scale=0.0), ValueError, "init_scale", "0.0"),
    ("fp16-growth", _call(LossScaledMixedPrecision, growth_interval=0), ValueError, "growth_interval", "0"),
    ("fp16-hold", _call(LossScaledMixedPrecision, hold_schedulers="yes"), ValueError, "hold_schedulers", "'yes'"),
    ("bf16-comp", _call(PureBF16, compensation="kahn"), ValueError, "compensation", "'kahn'"),
    ("bf16-seed", _call(PureBF16, seed=-1), ValueError, "seed", "-1"),
    # --- reduce-on-plateau -------------------------------------------------------------------------
    ("plateau-mode", _call(Plateau, mode="up"), ValueError, "mode", "'up'"),
    ("plateau-factor", _call(Plateau, factor=1.0), ValueError, "factor", "1.0"),
    ("plateau-patience", _call(Plateau, patience=-1), ValueError, "patience", "-1"),
    ("plateau-threshold", _call(Plateau, threshold=-0.1), ValueError, "threshold", "-0.1"),
    ("plateau-tmode", _call(Plateau, threshold_mode="relative"), ValueError, "threshold_mode", "'relative'"),
    # --- lottery tickets ---------------------------------------------------------------------------
    ("lt-rewind", _call(LotteryTicket, rewind_to="start"), ValueError, "rewind_to", "'start'"),
    ("lt-rewind-neg", _call(LotteryTicket, rewind_to=-3), ValueError, "rewind_to", "-3"),
    ("lt-round", _call(LotteryTicket, round_index=-1), ValueError, "round_index", "-1"),
    ("lt-layers-int", _call(LotteryTicket, layers=3), ValueError, "layers", "3"),
    ("lt-exclude-regex", _call(LotteryTicket, exclude=["conv", "("]), ValueError, "exclude", "'('"),
    ("ft-fraction", lambda: find_ticket(lambda: None, lambda run: None, prune_fraction=1.2), ValueError, "prune_fraction", "1.2"),
    ("ft-fraction-0", lambda: find_ticket(lambda: None, lambda run: None, prune_fraction=0), ValueError, "prune_fraction", "0"),
    ("ft-rounds", lambda: find_ticket(lambda: None, lambda run: None, rounds=0), ValueError, "rounds", "0"),
    ("ft-scope", lambda: find_ticket(lambda: None, lambda run: None, scope="local"), ValueError, "scope", "'local'"),
    # --- the checks themselves -------------------------------------------------------------------
    ("checks-fraction", lambda: checks.fraction("p", 2), ValueError, "p", "2"),
    ("checks-integer", lambda: checks.integer("n", "3"), ValueError, "n", "'3'"),
    ("checks-one_of-unhashable", lambda: checks.one_of("m", ["a"], ("a", "b")), ValueError, "m", "['a']"),
]


def test_the_table_is_big_enough():
    assert len(ROWS) >= 100


@pytest.mark.parametrize("thunk,exc,name,echo", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_argument_names_itself_and_its_value(thunk, exc, name, echo):
    with pytest.raises(exc) as info:
        thunk()
    message = str(info.value)
    assert f"`{name}`" in message or name in message.split("`")[1::2] or (exc is TypeError and name in message), message
    assert echo in message, f"{message!r} does not echo {echo!r}"
