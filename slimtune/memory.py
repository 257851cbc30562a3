"""Measurement: what the process holds (resident memory, its peak, the tensor bytes it creates), glibc heap
tuning, and telling an out-of-memory error from any other.

On Linux the CLI fixes glibc's mmap threshold (`limit_heap_retention`) and asks torch for huge pages
(THP_MEM_ALLOC_ENABLE=1), so that freed activations leave the process at once and resident memory follows the
tensor bytes the job holds; planner.py says how the prediction accounts for the heap.
"""

from __future__ import annotations

import ctypes
import weakref

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .devices import cuda_context_bytes

try:  # POSIX only; /proc or psutil stand in elsewhere
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

MMAP_THRESHOLD = 4 * 2**20  # with limit_heap_retention: blocks below this come from glibc's heap, larger from mmap


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
    if resource is not None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return getattr(psutil.Process().memory_info(), "peak_wset", process_rss())  # Windows: the peak working set


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


def limit_heap_retention(threshold: int = MMAP_THRESHOLD) -> bool:
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
