import sys
from pathlib import Path

import pytest

from slimtune import threads

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
threads.apply(threads.choose().count)  # as `slimtune fit` does: the cores other processes leave free


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.fail(f"test corpora not found at {DATA}: clone the project beside ../shared")
    return DATA
