#!/usr/bin/env bash
# Create .venv-vision: a SEPARATE venv with a torch + torchvision pair that imports on this CPU machine,
# pytest, and pl-optim itself installed without lightning (the vision tests use only the pure-torch core).
# Never install torchvision into the main .venv: the package index's torchvision is built for CUDA torch,
# fails to import beside the CPU torch 2.13 ("operator torchvision::nms does not exist") and can break lightning.
# Idempotent: a venv this script finished (marker .vision_ok, written after `import torchvision.models` worked)
# is kept as it is; delete the venv to rebuild it.
# The pair (override with VISION_TORCH / VISION_TORCHVISION), by `uname -m`:
#   x86_64:  torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB, runs on the CPU)
#   aarch64: torch 2.9.1  + torchvision 0.24.1 (a CPU build, ~0.7 GB)
# VISION_LIGHTNING=1 also installs lightning, torchmetrics, scikit-learn and matplotlib (versions resolved against the
# torch above, nothing else replaced) so the Lightning benchmarks can run a torchvision model, e.g.
#   .venv-vision/bin/python -m examples.benchmarks.bench_self_compression --arch tv_resnet18
# (the tests never need it; an existing venv gets them added).
# Exit code 0 only when the venv works; `make test-vision` runs tests/vision/ in it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VISION_VENV:-.venv-vision}
PY=${BASE_PYTHON:-$(command -v python3.11 || command -v python3)}
case "$(uname -m)" in
    aarch64 | arm64) TV_TORCH=2.9.1 TV_VISION=0.24.1 ;;
    *) TV_TORCH=2.14.1 TV_VISION=0.29.1 ;;
esac
TV_TORCH=${VISION_TORCH:-$TV_TORCH}
TV_VISION=${VISION_TORCHVISION:-$TV_VISION}
t0=$SECONDS
stage() { echo "[setup-vision +$((SECONDS - t0))s] $*"; }
works() { "$VENV/bin/python" -c "import torch, torchvision.models, pytest, pl_optim.compression" 2>/dev/null; }
PIP=("$VENV/bin/python" -m pip)
# pip's configured extra indexes print one "is ignored" line per package: keep the output readable
pip_quiet() { "${PIP[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
with_lightning() {
    [ "${VISION_LIGHTNING:-0}" = 1 ] || return 0
    stage "VISION_LIGHTNING=1: adding lightning, torchmetrics, scikit-learn, matplotlib (torch kept)"
    pip_quiet install -q --progress-bar off "torch==$TV_TORCH" "lightning>=2.6" "torchmetrics>=1.9" "scikit-learn>=1.9" "matplotlib>=3.11"
    "$VENV/bin/python" -c "import lightning.pytorch, torchvision.models, sklearn" || { stage "FAILED: lightning beside torchvision"; exit 1; }
    stage "lightning $("$VENV/bin/python" -c "import lightning; print(lightning.__version__)") imports beside torchvision"
}
if [ -f "$VENV/.vision_ok" ] && [ -x "$VENV/bin/python" ]; then  # checked when it was made (an import takes ~1 min)
    stage "keeping $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), torchvision $("$VENV/bin/python" -c 'import torchvision; print(torchvision.__version__)'))"
    touch "$VENV/.vision_ok"
    with_lightning
    exit 0
fi
rm -f "$VENV/.vision_ok"
if [ ! -x "$VENV/bin/python" ]; then
    stage "creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
stage "installing torch==$TV_TORCH torchvision==$TV_VISION (large: taken from local disk when pip finds it there)"
pip_quiet install -q --progress-bar off "torch==$TV_TORCH" "torchvision==$TV_VISION"
stage "installing pytest and pl-optim (editable, --no-deps: no lightning in this venv)"
pip_quiet install -q --progress-bar off "pytest>=8" "setuptools>=77"
pip_quiet install -q --progress-bar off --no-deps --no-build-isolation -e .
if works; then
    touch "$VENV/.vision_ok"
    with_lightning
    stage "done: $("$VENV/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
else
    stage "FAILED: torchvision.models does not import in $VENV"
    "$VENV/bin/python" -c "import torchvision.models" || true
    exit 1
fi
