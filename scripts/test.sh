#!/usr/bin/env bash
# Fresh machine to a test run: set up .venv with the test extras, check the code with ruff, then run the suite
# (about two minutes on 2 cores). Tests read the corpora in ../shared/data. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check .
ruff format --check .
exec python -m pytest -q "$@"
