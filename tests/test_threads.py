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
    assert threads.choose(1).count == 1 and "`threads` 1" in threads.choose(1).reason
    assert "threads" in threads.choose(1).reason.params  # shown as --threads by the CLI
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


class FakeClock:
    """Stands in for threads._cpu_seconds: the test says how many cores others kept busy in each interval."""

    def __init__(self):
        self.machine = self.me = self.wall = 0.0

    def __call__(self):
        return self.machine, self.me, self.wall

    def advance(self, seconds, others, mine=2.0):
        self.wall += seconds
        self.me += mine * seconds
        self.machine += (mine + others) * seconds


def test_load_watch_drops_threads_at_once_and_adds_them_after_two_quiet_checks(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(threads, "_cpu_seconds", clock)
    monkeypatch.setattr(threads, "_now", lambda: clock.wall)
    watch = threads.LoadWatch(cores=2)
    clock.advance(1.0, others=0.0)
    assert watch.check(2) is None  # quiet: stay
    clock.advance(1.0, others=0.7)  # a neighbour got its share of a core
    assert watch.check(2) == 1
    clock.advance(1.0, others=1.0, mine=1.0)
    assert watch.check(1) is None  # still there
    clock.advance(1.0, others=0.0, mine=1.0)
    assert watch.check(1) is None  # one quiet check is not enough
    clock.advance(0.1, others=0.0, mine=1.0)
    assert watch.check(1) is None  # too short to count: merged with the next
    clock.advance(1.0, others=0.0, mine=1.0)
    assert watch.check(1) == 2


def test_a_run_follows_a_neighbour_that_starts_mid_run(monkeypatch, tmp_path, data_dir):
    """The Trainer checks the load between steps when the count was chosen (not when given), applies the new
    count, says so, and records it in the run state."""
    import torch
    from helpers import tiny_model

    from slimtune.train import FitOptions, Trainer

    monkeypatch.delenv(threads.ENV, raising=False)
    clock = FakeClock()
    monkeypatch.setattr(threads, "_cpu_seconds", clock)
    monkeypatch.setattr(threads, "_now", lambda: clock.wall)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:20000]), dtype=torch.uint8)
    before = torch.get_num_threads()
    try:
        for given, expected in ((None, [2, 1, 1]), (2, [2, 2, 2])):
            torch.set_num_threads(2)
            warnings = []
            options = FitOptions(seq_len=32, steps=3, chunk_size=8, device="cpu", threads=given, run_dir=None)
            trainer = Trainer(tiny_model(dtype=torch.float32), data, options, chunk_size=8, on_warning=warnings.append)
            trainer.setup()
            used = []
            for others in (0.0, 0.9, 1.0):
                clock.advance(1.0, others=others)
                trainer.step()
                used.append(torch.get_num_threads())
            assert used == expected
            assert bool(warnings) == (given is None)
            if given is None:
                assert "another process is keeping a core busy: 1 CPU thread(s) from step 2 on" in warnings[0]
    finally:
        torch.set_num_threads(before)
