"""How many intra-op threads torch uses on CPU: chosen for the cores that are actually free.

A SLiM step on CPU is many small parallel regions (a few per op, per chunk). When another process keeps a core
busy, each region waits for a worker thread the scheduler has put aside, and the step collapses: measured here
at C = 256, L = 8192 (d 256, 3 layers) on 2 cores, 0.84 s quiet with 2 threads, 37 s next to one busy process,
while 1 thread took 1.29 s either way (benchmarks/RESULTS.md, "Threads and a busy neighbour"). Large GEMMs (full
backprop) suffer much less. So the count is: `threads` / SLIMTUNE_THREADS when given, else the cores this
process may run on (its affinity) less those other processes keep busy, measured over a short interval, at
least 1. Between chunks and steps a `LoadWatch` follows neighbours that start or stop during the run (unless the
count was given). Results depend on the count in the last bits, so the run state records it and a resumed run starts on
the same count: it ends bit for bit where an uninterrupted run under the same load would.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import psutil
import torch

from .errors import ConfigError, Notice

ENV = "SLIMTUNE_THREADS"
SAMPLE_SECONDS = 0.25  # how long the load of other processes is measured
BUSY_SLACK = 0.25  # a core counts as taken once others use more than this share of it


@dataclass(frozen=True)
class ThreadChoice:
    count: int  # intra-op threads
    reason: str  # why, for `slimtune env` and the logs
    cores: int  # cores this process may run on
    busy: float  # cores kept busy by other processes when measured


def usable_cores() -> int:
    """The cores this process may run on (CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_now = time.monotonic


def _cpu_seconds() -> tuple[float, float, float]:
    """(CPU seconds of the whole machine, of this process, wall clock), for the load between two readings."""
    machine, me = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = sum(getattr(machine, f) for f in ("user", "nice", "system", "irq", "softirq") if hasattr(machine, f))
    return busy, me.user + me.system, _now()


def _others(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores other processes kept busy between two `_cpu_seconds` readings."""
    wall = after[2] - before[2]
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall) if wall > 0 else 0.0


def _free(cores: int, busy: float) -> int:
    return max(1, cores - max(0, math.ceil(busy - BUSY_SLACK)))


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores other processes kept busy over `seconds`: the machine's CPU time less this process's own."""
    before = _cpu_seconds()
    time.sleep(seconds)
    return _others(before, _cpu_seconds())


def requested(value: int | str | None = None) -> int | None:
    """The user's count: `value` (the `threads` option), else SLIMTUNE_THREADS, else None (choose)."""
    if value is None:
        value = os.environ.get(ENV) or None
    if value is None:
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"`threads` must be a positive integer, got {value!r} (`threads` or {ENV})", params=("threads",)
        ) from None
    if count < 1:
        raise ConfigError(
            f"`threads` must be a positive integer, got {count} (`threads` or {ENV})", params=("threads",)
        )
    return count


def choose(value: int | str | None = None) -> ThreadChoice:
    """The thread count for this process (see the module docstring); nothing is applied here."""
    cores = usable_cores()
    count = requested(value)
    if count is not None:
        source = "threads" if value is not None else ENV
        return ThreadChoice(
            count,
            Notice(f"`{source}` {count}" if value is not None else f"{source} {count}", params=("threads",)),
            cores,
            float("nan"),
        )
    if cores == 1:
        return ThreadChoice(1, "one usable core", cores, 0.0)
    busy = busy_cores()
    free = _free(cores, busy)
    reason = (
        f"{cores} usable cores, all free"
        if free == cores
        else f"{cores} usable cores, {busy:.1f} kept busy by other processes"
    )
    return ThreadChoice(free, reason, cores, busy)


def apply(count: int) -> None:
    """Use `count` intra-op threads from now on (CPU work; CUDA kernels are not affected)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


class LoadWatch:
    """A neighbour that starts (or stops) in the middle of a run: checked between chunks and steps, the cores other
    processes kept busy since the last reading give the count from now on. Fewer threads at once (a step on
    threads that wait for a taken core took 10-40x its time); more only after two quiet readings in a row.
    Readings are SAMPLE_SECONDS apart at least; a check in between costs one clock read. Used when the count was
    chosen, not given."""

    def __init__(self, cores: int | None = None):
        self.cores = cores or usable_cores()
        self.since = _cpu_seconds()
        self.quiet_checks = 0

    def check(self, current: int) -> int | None:
        """The count to use from now on when it should change, else None."""
        if _now() - self.since[2] < SAMPLE_SECONDS:
            return None
        now = _cpu_seconds()
        free = _free(self.cores, _others(self.since, now))
        self.since = now
        if free < current:
            self.quiet_checks = 0
            return free
        self.quiet_checks = self.quiet_checks + 1 if free > current else 0
        if self.quiet_checks >= 2:
            self.quiet_checks = 0
            return free
        return None
