"""The lottery example and the benchmark's summary logic."""

from __future__ import annotations

import pytest

from examples.benchmarks.bench_lottery import summarise
from pl_optim.callbacks import TicketResult


@pytest.mark.slow
def test_lottery_digits_example_prints_the_table_and_saves_the_figure(tmp_path, capsys):
    from examples.lottery_digits import main

    res = main(["--rounds", "1", "--epochs", "1", "--rewind-to", "init", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ticket" in out and "random_masks" in out and "CSR" in out
    assert (tmp_path / "lottery_digits.png").stat().st_size > 1000
    assert [r["kind"] for r in res.runs] == ["ticket", "ticket", "reinit", "random_masks"]


def _result(accs: dict[int, dict[str, float]], remaining: dict[int, float]) -> TicketResult:
    return TicketResult(runs=[{"round": r, "kind": k, "remaining": remaining[r], "params": 1, "metrics": {"val_acc": a}}
                              for r, kinds in accs.items() for k, a in kinds.items()])


def test_benchmark_targets_are_computed_as_stated():
    rem = {0: 1.0, 1: 0.3, 2: 0.1, 3: 0.04}
    seed0 = _result({0: {"ticket": 0.98}, 1: {"ticket": 0.978, "reinit": 0.97}, 2: {"ticket": 0.97, "reinit": 0.96},
                     3: {"ticket": 0.976, "reinit": 0.95}}, rem)
    seed1 = _result({0: {"ticket": 0.98}, 1: {"ticket": 0.98, "reinit": 0.97}, 2: {"ticket": 0.97, "reinit": 0.96},
                     3: {"ticket": 0.976, "reinit": 0.93}}, rem)
    s = summarise([seed0, seed1])
    assert s["smallest_within_0.5pp"] == 0.3  # level 2 drops 1 pp: the run of "within" levels ends there
    assert s["gap_at_5pct"][0] == 0.04 and s["gap_at_5pct"][1] == pytest.approx(0.036)
