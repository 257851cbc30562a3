"""How many intra-op threads torch uses on CPU: chosen for the cores that are actually free.

A SLiM step on CPU is many small parallel regions (a few per op, per chunk). When another process keeps a core
busy, each region waits for a worker thread the scheduler has put aside, and the step collapses: measured here
at C = 256, L = 8192 (d 256, 3 layers) on 2 cores, 0.84 s quiet with 2 threads, 37 s next to one busy process,
while 1 thread took 1.29 s either way (benchmarks/RESULTS.md, "Threads and a busy neighbour"). Large GEMMs (full
backprop) suffer much less. So the count is: `--threads` / SLIMTUNE_THREADS when given, else the cores this
process may run on (its affinity) less those other processes keep busy, measured over a short interval, at
least 1. A run keeps its count from start to end (results depend on it in the last bits) and records it, so a
resumed run uses the same count and ends bit for bit where an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import psutil
import torch

from .errors import ConfigError

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


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores other processes kept busy over `seconds`: the machine's CPU time less this process's own."""
    me = psutil.Process()
    before_all, before_me = psutil.cpu_times(), me.cpu_times()
    started = time.monotonic()
    time.sleep(seconds)
    after_all, after_me = psutil.cpu_times(), me.cpu_times()
    wall = time.monotonic() - started
    busy_all = sum(
        getattr(after_all, f) - getattr(before_all, f)
        for f in ("user", "nice", "system", "irq", "softirq")
        if hasattr(after_all, f)
    )
    busy_me = (after_me.user - before_me.user) + (after_me.system - before_me.system)
    return max(0.0, (busy_all - busy_me) / wall)


def requested(value: int | str | None = None) -> int | None:
    """The user's count: `value` (--threads), else SLIMTUNE_THREADS, else None (choose)."""
    if value is None:
        value = os.environ.get(ENV) or None
    if value is None:
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"threads must be a positive integer, got {value!r} (--threads or {ENV})") from None
    if count < 1:
        raise ConfigError(f"threads must be a positive integer, got {count} (--threads or {ENV})")
    return count


def choose(value: int | str | None = None) -> ThreadChoice:
    """The thread count for this process (see the module docstring); nothing is applied here."""
    cores = usable_cores()
    count = requested(value)
    if count is not None:
        source = "--threads" if value is not None else ENV
        return ThreadChoice(count, f"{source} {count}", cores, float("nan"))
    if cores == 1:
        return ThreadChoice(1, "one usable core", cores, 0.0)
    busy = busy_cores()
    free = max(1, cores - max(0, math.ceil(busy - BUSY_SLACK)))
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
