#!/usr/bin/env bash
# Everything a GPU must show, in one call (benchmarks/gpu.py says what): on a GPU machine with torch, safetensors,
# psutil, nvidia-ml-py, typer, rich and pytest installed, no install of slimtune needed.
#   bash benchmarks/gpu.sh OUT                        # under 8 minutes on an H100/H200
#   bash benchmarks/gpu.sh OUT --device cpu --quick   # every part at toy sizes on CPU (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash benchmarks/gpu.sh OUT [--device cpu] [--quick] [--parts tests,planner,bench,profile]" >&2
  exit 2
fi
out="$1"
shift
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" benchmarks/gpu.py "$out" "$@"
