#!/usr/bin/env bash
# Create .venv and install slimtune into it. With no NVIDIA GPU, torch is a CPU build (a few hundred MB, not
# several GB): pip's own configuration (pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS) picks the index, and the CPU
# build is recognised by its version suffix (+cpu). Where your index has no CPU build, point
# SLIMTUNE_CPU_INDEX at a CPU wheel index (README, "Set-up"); SLIMTUNE_CPU_TORCH picks the version.
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
    pip_q install "torch>=2.5,<3"
else
    cpu_version="${SLIMTUNE_CPU_TORCH:-2.13.0}"
    index=()
    [ -n "${SLIMTUNE_CPU_INDEX:-}" ] && index=(--extra-index-url "$SLIMTUNE_CPU_INDEX")
    found=$(python -m pip install "torch==${cpu_version}" "${index[@]}" --dry-run --ignore-installed --no-deps -q \
        --report - 2>/dev/null \
        | python -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' 2>/dev/null || true)
    if [[ "$found" == *+cpu ]]; then
        echo "setup: no GPU, installing the CPU build torch ${found}"
        pip_q install "torch==${found}" "${index[@]}"
    else
        echo "setup: no GPU, but pip's index offers no CPU build of torch ${cpu_version} (found '${found:-none}');" \
             "installing the default build. Set SLIMTUNE_CPU_INDEX to a CPU wheel index to get the small one." >&2
        pip_q install "torch>=2.5,<3" "${index[@]}"
    fi
fi
pip_q install -e ".${extras:+[$extras]}"
echo "setup: $(slimtune --version) in $(pwd)/.venv (activate with: . .venv/bin/activate)"
