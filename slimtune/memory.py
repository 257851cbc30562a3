"""Memory: device detection, budgets, measured peaks, and the planner that picks the largest chunk size C
whose predicted peak fits the budget.

The budget covers everything the job holds on the device. On CPU that is the process's resident memory (RSS):
the runtime (Python, torch, the loaded checkpoint), the weights, gradients, optimizer state, one chunk's
activations, the recurrent states and the tokens. On CUDA it is what the job takes of the card: the CUDA context
plus the caching allocator's reserved memory.

What the prediction is made of, line by line (see `planner.predict`):
- runtime     measured: RSS after the probe steps (Python, torch, kernels' code and caches, the weights) on CPU;
              the CUDA context plus the allocated weights on CUDA.
- gradients   computed: one per parameter, in the parameters' dtype.
- optimizer   measured: the optimizer's state, from one probe step with zero gradients and lr 0.
- chunk       measured: the tensor bytes one step holds at its peak besides the gradients (activations and
              temporaries), counted by `TensorBytes` at two chunk sizes and extrapolated linearly in C.
- states      computed: per-layer attention states, their copies and gradients, and the token windows.
- heap        calibrated: on CPU glibc's heap holds more than the tensors it serves (blocks below the mmap
              threshold are reused but kept, and fragment): HEAP_OVERHEAD x the share of a chunk's bytes that
              falls in heap-sized blocks at that C (the probe records every block's size; activations scale
              with C, so at large C they move to mmap, which returns them exactly).
The optimizer step's own peak (gradients + state + temporaries, counted) is compared with the backward's.

On Linux the CLI fixes glibc's mmap threshold at 4 MB (`limit_heap_retention`) and asks torch for huge pages
(THP_MEM_ALLOC_ENABLE=1), so that freed activations leave the process at once, cheaply, and resident memory
follows the tensor bytes the job holds.
"""

from __future__ import annotations

import ctypes
import re
import resource
import weakref
from decimal import Decimal

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .devices import nvml_other_processes_bytes
from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
SAFETY_MARGIN = 0.10  # with no --mem-budget, leave this share of the free memory alone


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9, '1.5GiB' -> 1.5 * 2^30, '512MB', '900000000'. Decimal units are powers of 10, binary of 2."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = Decimal(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read size {text!r}: write it like 2GB, 1.5GiB, 512MB or 900000000")
        value, unit = Decimal(match.group(1)), match.group(2).lower()
    if value.adjusted() > 30:  # more than 10^30 of anything: no machine has it
        raise ConfigError(f"size {text!r} is larger than any device: write it like 2GB, 1.5GiB or 512MB")
    size = value * _UNITS[unit]  # exact decimal arithmetic: 4611686019GB is 4611686019 * 10^9 bytes, not a float
    if size < 1:
        raise ConfigError(f"size {text!r} must be at least 1 byte")
    return int(size)


def format_size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when usable, else cpu. Raises ConfigError for a device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no usable CUDA device here; use --device cpu (or auto)")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..")
        return device
    raise ConfigError(f"--device must be auto, cpu or cuda, got {name!r}")


def process_rss() -> int:
    return psutil.Process().memory_info().rss


def _kernel_peak_rss() -> int:
    """The kernel's high-water mark of resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """The process's peak resident memory since it started or since reset_peak_rss(), in bytes."""
    return _kernel_peak_rss()


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux /proc/self/clear_refs), so that the next job in this process
    reports its own peak. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


HEAP_THRESHOLD = 4 * 2**20  # blocks below this come from glibc's heap, at and above it from mmap
# Resident bytes per tensor byte in heap-sized blocks at a training run's peak: glibc reuses freed blocks but
# keeps and fragments them, more so over many chunks and steps. Calibrated, not measured per run: a single
# probe step from a trimmed heap shows only ~1.35, while runs show about 2 (benchmarks/planner_accuracy.py
# for d = 256, and the demo's d = 64 model, where every block is heap-sized).
HEAP_OVERHEAD = 2.0


def limit_heap_retention(threshold: int = HEAP_THRESHOLD) -> bool:
    """Make glibc return freed blocks of `threshold` bytes or more to the OS at once (a fixed mmap threshold),
    so that resident memory follows the large activations the job holds instead of the largest heap it ever
    had: glibc otherwise raises its threshold to 32 MB as big blocks are freed, keeps them, and the RSS of a
    run depends on its history. Smaller blocks stay in the heap, where reuse is fast (4 MB keeps SLiM's
    chunk-sized tensors cheap; 128 kB made a C = 256 step twice as slow with page faults). Call it, and set
    THP_MEM_ALLOC_ENABLE=1 for torch's huge-page allocations, before torch allocates. False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc malloc_trim), e.g. after the planner's probe steps, whose
    freed activations would otherwise stay resident and be counted as runtime. False where not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def peak_memory_bytes(device: torch.device) -> int:
    """Measured peak: RSS on CPU; CUDA context + the caching allocator's peak reservation on CUDA."""
    if device.type == "cuda":
        return cuda_context_bytes(device) + torch.cuda.max_memory_reserved(device)
    return peak_rss()


def cuda_context_bytes(device: torch.device) -> int:
    """What the CUDA context itself holds: memory used on the card beyond what the allocator reserved
    (exact when this process is alone on the card)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device) - nvml_other_processes_bytes(device))


def available_bytes(device: torch.device) -> int:
    """What this job could hold in all: RSS plus the system's available memory (CPU), or the card's free
    memory plus what this process already reserved (CUDA)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) + cuda_context_bytes(device)
    return process_rss() + psutil.virtual_memory().available


def resolve_budget(budget: str | int | None, device: torch.device) -> tuple[int, int]:
    """(effective budget, available): the smaller of the user's budget and what is free. `budget` is a size,
    a percentage of the available memory ('80%'), or None for the available memory less a safety margin."""
    available = available_bytes(device)
    if budget is None:
        return int(available * (1 - SAFETY_MARGIN)), available
    if isinstance(budget, str) and budget.strip().endswith("%"):
        try:
            share = float(budget.strip()[:-1])
        except ValueError:
            raise ConfigError(f"cannot read budget {budget!r}: write a size (2GB) or a percentage (80%)") from None
        if not 0 < share <= 100:
            raise ConfigError(f"budget {budget!r} must be a percentage in (0, 100]")
        return int(available * share / 100), available
    return min(parse_size(budget), available), available


class TensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active, live and at peak. Deterministic, unlike RSS,
    and the same on any device; tensors that existed before entering (the weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.sizes: list[int] = []  # every storage created, in bytes
        self._seen: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen:
                continue  # a view of a storage already counted
            self._seen[key] = nbytes
            self.sizes.append(nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def is_out_of_memory(error: BaseException) -> bool:
    """A device (CUDA) or host (CPU allocator) allocation failure, as opposed to any other error."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))


def emulate_card(size: str | int, device: torch.device) -> int:
    """Make this process see a CUDA card of `size` bytes in all (e.g. 2GB for a small card): the caching
    allocator is capped (torch.cuda.set_per_process_memory_fraction) at `size` less the CUDA context this
    process already holds, as the context takes its share of a real small card too. Returns the allocator cap."""
    if device.type != "cuda":
        raise ConfigError(f"--emulate-memory caps a CUDA card, but the device is {device}: drop it or use --device cuda")
    wanted = parse_size(size)
    torch.zeros(1, device=device)  # creates the context, so that its size can be read
    total = torch.cuda.get_device_properties(device).total_memory
    cap = wanted - cuda_context_bytes(device)
    if cap <= 0 or wanted >= total:
        raise ConfigError(f"--emulate-memory {size} must lie between the CUDA context "
                          f"({format_size(cuda_context_bytes(device))}) and the card's {format_size(total)}")
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap
