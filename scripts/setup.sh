#!/usr/bin/env bash
# Create .venv and install slimtune into it. With no NVIDIA GPU, torch is a CPU build (a few hundred MB,
# not several GB): one pip can already find (a local wheel), else PyTorch's CPU wheel index.
# Usage: bash scripts/setup.sh [extras], e.g. `bash scripts/setup.sh test`. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip --disable-pip-version-check -q "$@"; }

if python -c "import torch" 2>/dev/null; then
    echo "setup: using the installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing a CUDA build of torch"
    pip_q install "torch>=2.1,<3"
else
    cpu_version="${SLIMTUNE_CPU_TORCH:-2.13.0}"
    found=$(python -m pip install "torch==${cpu_version}" --dry-run --ignore-installed --no-deps -q --report - 2>/dev/null \
        | python -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' 2>/dev/null || true)
    if [[ "$found" == *+cpu ]]; then
        echo "setup: no GPU, installing the CPU build torch ${found}"
        pip_q install "torch==${found}"
    else
        echo "setup: no GPU, installing torch from PyTorch's CPU wheel index"
        pip_q install "torch>=2.1,<3" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
fi
pip_q install -e ".${extras:+[$extras]}"
echo "setup: $(slimtune --version) in $(pwd)/.venv (activate with: . .venv/bin/activate)"
