import os
import sys
from pathlib import Path

import pytest

from slimtune import threads

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# One thread count for the whole session, chosen once as `slimtune fit` does (the cores other processes leave free)
# and given to every run through the environment, subprocesses included: results depend on the count in the last
# bits, so two runs a test compares bit for bit must not each choose their own under a changing load. Tests of the
# choice itself remove it (tests/test_threads.py).
os.environ.setdefault(threads.ENV, str(threads.choose().count))
threads.apply(threads.choose().count)


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.fail(f"test corpora not found at {DATA}: clone the project beside ../shared")
    return DATA
