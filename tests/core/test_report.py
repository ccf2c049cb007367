"""pl_optim.report.Table: prints as a table, converts to dicts and DataFrames, reads like a list."""

from __future__ import annotations

import sys
import types

import pytest

from pl_optim.compression import attach_quantizers, layer_sizes
from pl_optim.compression.report import format_report, size_table
from pl_optim.report import Table

ROWS = [{"layer": "conv", "bits": 3.25, "n": 12}, {"layer": "fc", "bits": 8.0, "n": 4}]


def test_prints_aligned_columns_with_title_and_footer():
    t = Table(ROWS, formats={"bits": ".2f"}, title="sizes", footer={"layer": "total", "n": 16})
    assert str(t).splitlines() == [
        "sizes",
        "layer  bits   n",
        "---------------",
        "conv   3.25  12",
        "fc     8.00   4",
        "---------------",
        "total        16",
    ]
    assert repr(t) == str(t)


def test_rows_dicts_and_list_behaviour():
    t = Table(ROWS)
    assert t.to_dicts() == ROWS and t.to_dicts() is not t.rows
    t.to_dicts()[0]["n"] = 99
    assert t[0]["n"] == 12  # copies
    assert len(t) == 2 and [r["layer"] for r in t] == ["conv", "fc"] and t[-1]["bits"] == 8.0
    assert t == Table(ROWS) and t != Table(ROWS[:1])
    assert t.columns == ["layer", "bits", "n"]


def test_long_tables_print_head_and_tail():
    t = Table([{"step": k, "lr": 10.0**k} for k in range(30)], max_rows=4)
    lines = str(t).splitlines()
    assert lines[2:] == ["   0      1", "   1     10", "... (26 more rows)", "  28  1e+28", "  29  1e+29"]
    assert len(t.to_dicts()) == 30


def test_empty_table_and_bad_footer():
    assert str(Table([], title="nothing")).splitlines()[-1] == "(no rows)"
    with pytest.raises(ValueError, match=r"`footer` must name columns of the table \['layer', 'bits', 'n'\], got \['size'\]"):
        Table(ROWS, footer={"size": 1})


def test_to_pandas_passes_rows_and_column_order(monkeypatch):
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda data, columns: ("frame", data, columns)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    assert Table(ROWS).to_pandas() == ("frame", ROWS, ["layer", "bits", "n"])


def test_to_pandas_without_pandas_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(ImportError, match=r"needs pandas \(`pip install pandas`\); Table.to_dicts\(\) gives the same rows"):
        Table(ROWS).to_pandas()


def test_compression_report_is_a_table():
    from examples.models import DigitsConvNet

    model = DigitsConvNet(channels=(4, 8, 8))
    attach_quantizers(model.net, init_bits=8)
    rows = layer_sizes(model)
    table = size_table(rows, title="report")
    assert [r["name"] for r in table] == ["net.0.0", "net.1.0", "net.3.0", "net.6"]
    assert table[0]["pct_float"] == pytest.approx(25.0)  # 8 of 32 bits
    assert table.to_dicts()[1] == {**rows[1].as_dict(), "pct_float": pytest.approx(25.0)}
    last = str(table).splitlines()[-1].split()
    assert last[0] == "total" and float(last[1]) == sum(r.size_bits for r in rows)
    assert format_report(rows) == str(size_table(rows))
