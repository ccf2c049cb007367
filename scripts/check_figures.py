"""Re-run the cheap figure sources and check that README.md and the method cards say what they print.

    .venv/bin/python scripts/check_figures.py            # all (about 2 minutes on 2 cores); make figures
    .venv/bin/python scripts/check_figures.py --only digits_one_cycle

Each figure source is a command whose ``[demo]`` lines (``examples/cli.py``) give the numbers; each
document names the sentences that quote them (templates filled from the fresh run, matched with
whitespace collapsed). A sentence that no longer matches is printed with the command and the
measured value, and the exit status is 1. Wall-clock times are not checked (they vary run to run).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(config: str) -> list[str]:
    return [sys.executable, "-m", "examples.cli", "fit", "--config", f"examples/configs/{config}.yaml"]


FIND_CALLBACKS = ('[{"class_path": "pl_optim.callbacks.LRRangeTest", "init_args": {"plot_path": null}}, '
                  '{"class_path": "pl_optim.callbacks.OneCycle", '
                  '"init_args": {"max_lr": "find", "pct_start": 0.25, "beta2": 0.99}}]')

# name -> (command, {document: [templates]}); template fields are the keys of parse_demo().
FIGURES: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "digits_convnet": (
        cli("digits_convnet"),
        {
            "README.md": ["{parameters:,} parameters, {epochs} epochs, {steps} optimizer steps",
                          "`val_acc = {val_acc:.4f}`"],
            "docs/one_cycle.md": ["(`digits_convnet.yaml`): val_acc {val_acc:.4f}"],
        },
    ),
    "digits_self_compression": (
        cli("digits_self_compression"),
        {
            "README.md": [
                "{epochs} epochs, {steps} optimizer steps: `val_acc = {val_acc:.4f}`",
                "{self_compression_bits_pct:.2f}% of the float bits and {self_compression_weights_pct:.2f}% of the weights",
                "channels {channels_net_1_0} and {channels_net_3_0}",
                "{parameters:,} parameters left",
            ],
        },
    ),
    "digits_one_cycle_find": (
        cli("digits_one_cycle") + ["--trainer.callbacks=" + FIND_CALLBACKS],
        {
            "docs/one_cycle.md": ["suggested `max_lr = {suggested_lr:.4f}`, val_acc {val_acc:.4f}"],
        },
    ),
    "digits_one_cycle": (
        cli("digits_one_cycle"),
        {
            "README.md": ["`digits_one_cycle.yaml`: val_acc {val_acc:.4f}"],
            "docs/one_cycle.md": ["`digits_one_cycle.yaml` (AdamW, `max_lr=0.01`, `pct_start=0.25`, β2 0.99): val_acc {val_acc:.4f}"],
        },
    ),
}

_SUMMARY = re.compile(r"^\[demo\] (\w+): ([\d,]+) parameters, (\d+) epochs, (\d+) optimizer steps in ([\d.]+)s$")
_METRIC = re.compile(r"^\[demo\]\s+([\w/.]+) = (-?[\d.]+(?:e[-+]?\d+)?|nan|inf)$")
_SUGGESTED = re.compile(r"LRRangeTest: .*suggested lr per param group: \[([\d.e+-]+)")
_CHANNELS = re.compile(r"^\[demo\]\s+channels ([\w.]+) = (\d+) -> (\d+)$")


def key(name: str) -> str:
    """A metric or layer name as a template field: ``self_compression/bits_pct`` -> ``self_compression_bits_pct``."""
    return re.sub(r"\W", "_", name)


def parse_demo(output: str) -> dict[str, object]:
    """The numbers of ``examples/cli.py``'s ``[demo]`` lines: ``model``, ``parameters``, ``epochs``,
    ``steps``, ``seconds``, every metric (as a float), ``channels_<layer>`` (``"64 → 44"``) and
    ``suggested_lr`` (group 0's, from the LRRangeTest line).

    Raises:
        ValueError: the output has no ``[demo]`` summary line (the run failed or printed nothing).
    """
    values: dict[str, object] = {}
    for line in output.splitlines():
        line = line.rstrip()
        if m := _SUMMARY.match(line):
            values.update(model=m[1], parameters=int(m[2].replace(",", "")), epochs=int(m[3]), steps=int(m[4]),
                          seconds=float(m[5]))
        elif m := _SUGGESTED.search(line):
            values["suggested_lr"] = float(m[1])
        elif m := _CHANNELS.match(line):
            values[f"channels_{key(m[1])}"] = f"{m[2]} → {m[3]}"
        elif m := _METRIC.match(line):
            values[key(m[1])] = float(m[2])
    if "parameters" not in values:
        raise ValueError("no `[demo] <Model>: N parameters, ...` line in the output: the run failed")
    return values


def squash(text: str) -> str:
    return " ".join(text.split())


def mismatches(text: str, templates: list[str], values: dict[str, object]) -> list[str]:
    """The filled templates that ``text`` does not contain (whitespace collapsed on both sides).

    Raises:
        KeyError: a template names a value the run did not print.
    """
    body = squash(text)
    return [filled for filled in (squash(t.format(**values)) for t in templates) if filled not in body]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", choices=sorted(FIGURES), action="append",
                        help="check only this figure source (repeatable); default: all")
    args = parser.parse_args(argv)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    failures = 0
    for name in args.only or list(FIGURES):
        command, documents = FIGURES[name]
        shown = " ".join([".venv/bin/python", *(shlex.quote(c) for c in command[1:])])
        print(f"[figures] {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"[figures]   FAILED (exit {run.returncode}):\n{run.stderr[-2000:]}")
            failures += 1
            continue
        values = parse_demo(run.stdout + "\n" + run.stderr)
        print(f"[figures]   {time.perf_counter() - t0:.0f}s: " + ", ".join(
            f"{k}={v}" for k, v in values.items() if k not in ("model", "seconds")), flush=True)
        for doc, templates in documents.items():
            for filled in mismatches((ROOT / doc).read_text(), templates, values):
                print(f"[figures]   MISMATCH {doc} does not say: {filled}")
                failures += 1
    print(f"[figures] {'all figures match' if not failures else f'{failures} mismatch(es): update the text from this run'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
