"""What every benchmark script shares: ``--help`` with defaults, one-line argument errors, argument
types checked by :mod:`pl_optim.checks`, and a progress line per stage.

    parser = benchmark_parser(__doc__)
    parser.add_argument("--epochs", type=positive_int, default=45, help="training epochs")
    args = parser.parse_args(argv)
    progress = Progress("bench_channel_removal")
    progress("training the float baseline")        # [bench_channel_removal +0s] training the ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from pl_optim.checks import fraction as _fraction
from pl_optim.checks import integer, non_negative, positive


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (naming the argument), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def benchmark_parser(doc: str | None) -> OneLineParser:
    """A parser whose ``--help`` shows the module docstring and every argument's default."""
    lines = (doc or "").strip().splitlines()
    return OneLineParser(description=lines[0] if lines else None, epilog="\n".join(lines[1:]).strip() or None,
                         formatter_class=_Formatter)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help text, the docstring's layout kept."""


def _typed(convert: Callable[[str], Any], check: Callable[..., Any], **kw: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {convert.__name__}, got {text!r}") from None
        try:
            check("value", value, **kw)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err).replace("`value` ", "")) from None
        return value

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


positive_int = _typed(int, integer, minimum=1)
non_negative_int = _typed(int, integer, minimum=0)
positive_float = _typed(float, positive)
non_negative_float = _typed(float, non_negative)
fraction = _typed(float, _fraction)


class Progress:
    """``progress("stage")`` prints ``[name +Ns] stage`` (seconds since construction), flushed."""

    def __init__(self, name: str) -> None:
        self.name, self.t0 = name, time.perf_counter()

    def __call__(self, stage: str) -> None:
        print(f"[{self.name} +{time.perf_counter() - self.t0:.0f}s] {stage}", file=sys.stdout, flush=True)
