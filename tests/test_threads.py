"""The CPU thread count: --threads / SLIMTUNE_THREADS win; otherwise the usable cores less those other processes
keep busy (measured, and faked here), at least one."""

import subprocess
import sys
import time

import pytest

from slimtune import threads
from slimtune.errors import ConfigError


@pytest.mark.parametrize(
    "cores, busy, expected", [(2, 0.05, 2), (2, 0.3, 1), (2, 1.0, 1), (2, 2.0, 1), (8, 2.6, 5), (1, 0.0, 1)]
)
def test_free_cores_are_used(monkeypatch, cores, busy, expected):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.25: busy)
    assert threads.choose().count == expected


def test_flag_and_environment_win(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.25: pytest.fail("measured although given"))
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.choose().count == 3 and threads.ENV in threads.choose().reason
    assert threads.choose(1).count == 1 and "--threads" in threads.choose(1).reason
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(threads.ENV, bad)
        with pytest.raises(ConfigError, match=threads.ENV):
            threads.choose()


def test_a_busy_neighbour_is_measured():
    """One process spinning on a core shows up as about one busy core."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = threads.busy_cores(0.5)
    finally:
        neighbour.kill()
    assert 0.6 <= busy <= 2.5, busy
