"""Results of the recipe checks: one :class:`CheckResult` per check, a :class:`RecipeReport` table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STATUSES = ("pass", "warn", "fail", "skip")
COLUMNS = ("check", "status", "value", "expected", "fix to try")


@dataclass
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: the check (``"init_loss"``, ``"overfit_batch"``, ...).
        status: ``"pass"``, ``"warn"``, ``"fail"`` or ``"skip"`` (not applicable; ``detail`` says why).
        value: the measured number (``nan`` when skipped).
        expected: what a healthy set-up gives, in words with the numbers.
        fix: what to try when the status is not ``"pass"`` (empty otherwise).
        detail: how to read the value (e.g. why BatchNorm was checked in eval mode).
        extra: more numbers (per-layer statistics, ...), plain floats/strings.
    """

    name: str
    status: str
    value: float
    expected: str
    fix: str = ""
    detail: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "skip")

    def row(self) -> list[str]:
        """The table row: check, status, value, expected, fix."""
        return [self.name, self.status.upper(), _fmt(self.value), self.expected, self.fix]


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


@dataclass
class RecipeReport:
    """All check results, in the order they ran."""

    results: list[CheckResult] = field(default_factory=list)

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check {name!r}; ran {[r.name for r in self.results]}")

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def not_passed(self) -> list[str]:
        """Names of the checks that warned or failed."""
        return [r.name for r in self.results if not r.ok]

    def rows(self) -> list[list[str]]:
        return [r.row() for r in self.results]

    def table(self, width: int = 60) -> str:
        """A fixed-width checklist: ``[PASS] init_loss  2.31  expected ...  fix ...`` plus details."""
        name_w = max([len(r.name) for r in self.results] + [5])
        lines = [f"{'':7}{'check':<{name_w}}  {'value':>9}  expected"]
        for r in self.results:
            lines.append(f"[{r.status.upper():<4}] {r.name:<{name_w}}  {_fmt(r.value):>9}  {r.expected}")
            indent = " " * (9 + name_w + 11)
            if r.fix:
                lines.append(f"{indent}fix: {r.fix}")
            if r.detail:
                lines.append(f"{indent}note: {r.detail}")
        n = {s: sum(r.status == s for r in self.results) for s in STATUSES}
        lines.append(f"{n['pass']} passed, {n['warn']} warned, {n['fail']} failed, {n['skip']} skipped")
        return "\n".join(lines)

    def metrics(self, prefix: str = "recipe/") -> dict[str, float]:
        """Numbers for a logger: each check's value and its status (0 pass/skip, 1 warn, 2 fail)."""
        out: dict[str, float] = {}
        for r in self.results:
            if not math.isnan(r.value):
                out[f"{prefix}{r.name}"] = float(r.value)
            out[f"{prefix}{r.name}_status"] = float({"pass": 0, "skip": 0, "warn": 1, "fail": 2}[r.status])
        return out
