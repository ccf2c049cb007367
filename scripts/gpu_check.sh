#!/usr/bin/env bash
# Every GPU-only test and benchmark of pl_optim in one go, for a machine with a CUDA GPU.
# Usage: bash scripts/gpu_check.sh            (from the repository root, after `make setup`)
# fp8 needs compute capability >= 8.9 and torchao:  .venv/bin/pip install -e '.[fp8]'
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check.sh: no CUDA device visible; nothing GPU-only can run here")
cap = torch.cuda.get_device_capability()
print(f"GPU: {torch.cuda.get_device_name()} capability {cap[0]}.{cap[1]} (fp8 needs >= 8.9)")
PY
# GPU tests (they are skipped with a reason on CPU; here they must run: -rs lists any skip)
WANDB_MODE=offline "$PY" -m pytest -q -rs tests/callbacks/test_precision.py -k "cuda or gpu or fp8"
# FSDP (Lightning refuses it on CPU): optimizer-level callbacks on 2 GPUs (skipped with 1 GPU)
WANDB_MODE=offline "$PY" -m pytest -q -rs tests/callbacks/test_precision_fsdp.py
# the doc blocks marked ```python gpu run through the doc-snippet test when it exists
if [ -f tests/test_doc_snippets.py ]; then WANDB_MODE=offline "$PY" -m pytest -q -rs tests/test_doc_snippets.py; fi
# benchmark (CPU figures; run on the GPU box for comparison)
"$PY" -m examples.benchmarks.bench_precision --seeds 1 --reps 3
