#!/usr/bin/env bash
# Create .venv (Python 3.11 preferred), install torch (CPU build when no CUDA), then the package.
# Idempotent: an existing venv and an already-installed torch are kept. BASE_PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${BASE_PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] CUDA found: installing the default torch build"
    "$VENV/bin/python" -m pip install "torch>=2.13"
else
    echo "[setup] no CUDA: installing the CPU build of torch"
    "$VENV/bin/python" -m pip install "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
touch "$VENV/.pl_optim_installed"
