#!/usr/bin/env bash
# Fresh machine to a test run: set up .venv with the test extras, then run the suite. Tests read the corpora
# in ../shared/data. Extra arguments go to pytest (e.g. --runslow for the long tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
exec python -m pytest -q "$@"
