"""Reports as objects: a :class:`Table` prints as a fixed-width table and converts to plain data.

Used for every report pl_optim hands back (``LRRangeTest.report``, ``SelfCompression.report``):
``print(table)`` shows it, ``table.to_dicts()`` gives the rows as plain dicts, ``table.to_pandas()``
a ``DataFrame`` (pandas is optional). Indexing and iteration go over the rows, so code that treated
a report as a list of dicts keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


class Table:
    """Rows of plain values (one dict per row, the same keys in every row) that print as a table.

    Args:
        rows: the rows; columns are the keys of the first row, in order.
        formats: format spec per column (``{"lr": ".3g"}``); floats default to ``.4g``, everything
            else to ``str``.
        title: printed above the table.
        footer: a last line after a rule, e.g. totals (``{"layer": "total", "bits": 812}``); printed
            only, not part of :attr:`rows`; columns it leaves out stay blank.
        max_rows: print at most this many rows (the first and last halves, with ``...`` between).

    Example::

        t = Table([{"layer": "fc", "bits": 3.5}], formats={"bits": ".2f"}, title="sizes",
                  footer={"layer": "total", "bits": 3.5})
        print(t)           # the table
        t.to_dicts()       # [{'layer': 'fc', 'bits': 3.5}]
        t.to_pandas()      # a DataFrame (needs pandas)
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        formats: Mapping[str, str] | None = None,
        title: str = "",
        footer: Mapping[str, Any] | None = None,
        max_rows: int = 20,
    ) -> None:
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]
        self.columns: list[str] = list(self.rows[0]) if self.rows else []
        self.footer = dict(footer or {})
        unknown = [c for c in self.footer if c not in self.columns]
        if unknown:
            raise ValueError(f"`footer` must name columns of the table {self.columns}, got {unknown!r}")
        self.formats, self.title, self.max_rows = dict(formats or {}), title, max_rows

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as a list of new plain dicts."""
        return [dict(r) for r in self.rows]

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame``.

        Raises:
            ImportError: pandas is not installed (it is optional).
        """
        try:
            import pandas
        except ImportError as err:
            raise ImportError("Table.to_pandas() needs pandas (`pip install pandas`); "
                              "Table.to_dicts() gives the same rows without it") from err
        return pandas.DataFrame(self.to_dicts(), columns=self.columns)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Table):
            return self.rows == other.rows
        return NotImplemented

    def _cell(self, column: str, value: Any) -> str:
        spec = self.formats.get(column)
        if spec is not None and value is not None:
            return format(value, spec)
        if isinstance(value, float) and not isinstance(value, bool):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return str(value)

    def __str__(self) -> str:
        if not self.rows:
            return "\n".join(([self.title] if self.title else []) + ["(no rows)"])
        shown: list[dict[str, Any] | None] = list(self.rows)
        if len(shown) > self.max_rows:
            half = max(self.max_rows // 2, 1)
            shown = shown[:half] + [None] + shown[-half:]
        body = [None if r is None else [self._cell(c, r[c]) for c in self.columns] for r in shown]
        if self.footer:
            body.append([self._cell(c, self.footer[c]) if c in self.footer else "" for c in self.columns])
        widths = [max([len(c)] + [len(line[i]) for line in body if line is not None]) for i, c in enumerate(self.columns)]

        left = isinstance(self.rows[0][self.columns[0]], str)  # a label column

        def fmt(cells: Sequence[str]) -> str:
            first = f"{cells[0]:<{widths[0]}}" if left else f"{cells[0]:>{widths[0]}}"
            return "  ".join([first] + [f"{v:>{w}}" for v, w in zip(cells[1:], widths[1:])]).rstrip()

        head = fmt(self.columns)
        lines = ([self.title] if self.title else []) + [head, "-" * len(head)]
        for i, line in enumerate(body):
            if line is None:
                lines.append(f"... ({len(self.rows) - 2 * half} more rows)")
            elif self.footer and i == len(body) - 1:
                lines += ["-" * len(head), fmt(line)]
            else:
                lines.append(fmt(line))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)
