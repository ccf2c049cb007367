"""The digits example end to end (1 epoch): the model reloaded from its bit-packed file scores
exactly what the quantised model scored, and the file is far smaller than the float weights."""

from __future__ import annotations

import pytest

from examples.compress_digits import main, train


def test_example_train_round_trip():
    result = train(0.3, epochs=2)
    assert result["reloaded_acc"] == result["exported_acc"] == result["acc"]
    assert result["acc"] > 0.5
    assert 0 < result["bits_pct"] < 25.0  # started at 8 of 32 bits
    assert result["packed_bytes"] < result["float_bytes"] / 3


@pytest.mark.slow
def test_example_main_prints_and_plots(tmp_path, capsys):
    rows = main(["--gammas", "1.0", "--epochs", "1", "--out", str(tmp_path / "acc_vs_bits.png")])
    out = capsys.readouterr().out
    assert [r["gamma"] for r in rows] == [None, 1.0] and "% bits" in out and "float" in out
    assert (tmp_path / "acc_vs_bits.png").stat().st_size > 1000
