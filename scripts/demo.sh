#!/usr/bin/env bash
# Fresh machine to a finished demo: set up .venv, then run `slimtune demo` (no downloads at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slimtune demo "$@"
