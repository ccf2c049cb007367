#!/usr/bin/env bash
# Create .venv (Python 3.11 preferred), install torch (CPU build when no CUDA), then the package.
# Idempotent: an existing venv and an already-installed torch are kept. BASE_PYTHON picks the interpreter.
# Order of torch sources on a machine without CUDA (each tried once, the first that works wins):
#   1. a CPU wheel pip already knows locally (find-links / wheel cache): no network at all;
#   2. the PyTorch CPU index, probed once with a 5 s timeout (skipped at once when unreachable);
#   3. the default index (a CUDA build on Linux: large, but it runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${BASE_PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
t0=$SECONDS
stage() { echo "[setup +$((SECONDS - t0))s] $*"; }
if [ ! -x "$VENV/bin/python" ]; then
    stage "creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    stage "keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    stage "CUDA found: installing torch==$TORCH_VERSION (default build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
else
    stage "no CUDA: looking for a local CPU wheel of torch $TORCH_VERSION"
    if "${PIP[@]}" install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        stage "found a local torch wheel: installing its dependencies"
        "${PIP[@]}" install -q --progress-bar off "torch==$TORCH_VERSION"
    elif "$VENV/bin/python" - "$CPU_INDEX" <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=5)
except Exception:
    sys.exit(1)
PYEOF
    then
        stage "installing torch==$TORCH_VERSION+cpu from the PyTorch CPU index"
        "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" --index-url "$CPU_INDEX"
    else
        stage "PyTorch CPU index unreachable: installing torch==$TORCH_VERSION from the default index"
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    fi
fi
stage "installing pl-optim (editable) with the dev extras"
"${PIP[@]}" install -q --progress-bar off -e ".[dev]"
touch "$VENV/.pl_optim_installed"
stage "done"
