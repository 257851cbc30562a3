"""Measurement: what the process holds (resident memory, its peak, the tensor bytes it creates), glibc heap
tuning, and telling an out-of-memory error from any other.

Heap policy (glibc, CPU). Where a tensor's block lives decides both speed and resident memory. slimtune fixes
glibc's mmap threshold (`heap_policy_during`) where a run asks for a managed heap (`fit`'s default), and the
planner picks one of two settings per run:
- "tight": blocks of 4 MB or more are mmap'ed and return to the OS when freed, so resident memory follows the
  tensor bytes the job holds. Each large block is paid for again in page faults: a full-backprop step with adam
  at L = 8192 (d 256, 3 layers) took 1.12 s this way against 0.87 s with glibc's defaults (benchmarks/
  allocator.py), with a peak of 837 MB against 1.1 GB (benchmarks/RESULTS.md).
- "fast": blocks below 32 MB (glibc's own largest dynamic threshold) stay in the heap and are reused without
  faults: plain-PyTorch speed, and a peak that holds the heap's free blocks too.
A run uses "fast" when its predicted peak under that setting fits the budget with a margin, else "tight";
chunk-sized blocks of SLiM at C <= 512 (d 256) are below 4 MB and live in the heap either way. planner.py says how
the prediction accounts for the heap. (Huge pages, THP_MEM_ALLOC_ENABLE=1, are not asked for: with the kernel's default
"defrag=madvise" every huge-page fault may compact memory, and full backprop's step time varied 0.73-1.87 s.)

A third setting, "lean", is for the no-grad forward of `eval` and `generate` (eval_plan.py): blocks of 1 MB or more
are mmap'ed, so a chunk's temporaries of 1-4 MB leave the process when freed instead of fragmenting a heap shaped
by what the process did before (loading, the probes). At d 512 x 4, C = 1280 the loop held 1.2-1.3x its tensor
bytes this way (eval_plan.py has the calibration), against 2.2-3.1x under "tight" (the more chunks had run, the
more), and took as long (94 s against 95 s, 50 kB).
"""

from __future__ import annotations

import contextlib
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

HEAP_THRESHOLDS = {"lean": 2**20, "tight": 4 * 2**20, "fast": 32 * 2**20}  # glibc's mmap threshold under each policy
# Free memory at the top of the heap that glibc keeps rather than returning: its default (128 kB) for "tight" and
# "lean"; for "fast" twice the mmap threshold, as glibc itself sets it when it raises the threshold.
TRIM_THRESHOLDS = {"lean": 128 * 2**10, "tight": 128 * 2**10, "fast": 64 * 2**20}
_heap_policy: str | None = None  # what is set now; None: glibc's own dynamic threshold, untouched. Read by `env`.


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


_carried_peak = 0  # the peak before the last new_peak_window(), still part of peak_rss()


def peak_rss() -> int:
    """The process's peak resident memory since it started or since reset_peak_rss(), in bytes."""
    return max(_carried_peak, _kernel_peak_rss())


def _clear_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux /proc/self/clear_refs), so that the next job in this process
    reports its own peak. False where the kernel does not allow it."""
    global _carried_peak
    _carried_peak = 0
    return _clear_peak()


def new_peak_window() -> bool:
    """Start a window whose own peak `window_peak_rss()` reads (the planner's probes), without losing the peak
    before it from `peak_rss()`. False where the kernel does not allow it (the window then reaches back to the
    process's start)."""
    global _carried_peak
    _carried_peak = max(_carried_peak, _kernel_peak_rss())
    return _clear_peak()


def window_peak_rss() -> int:
    """The peak resident memory since new_peak_window() (or since reset_peak_rss(), or the start)."""
    return _kernel_peak_rss()


def set_heap_policy(policy: str) -> bool:
    """Fix glibc's mmap and trim thresholds for `policy` ("tight", "fast" or "lean", see the module docstring):
    blocks of at least the mmap threshold are mmap'ed and leave the process when freed; smaller ones stay in the
    heap, which keeps up to the trim threshold free at its top. Affects allocations from now on. False where the C
    library is not glibc (nothing changes there)."""
    global _heap_policy
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = bool(libc.mallopt(-3, HEAP_THRESHOLDS[policy]))  # M_MMAP_THRESHOLD
        done = done and bool(libc.mallopt(-1, TRIM_THRESHOLDS[policy]))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
    if done:
        _heap_policy = policy
    return done


def heap_policy() -> str | None:
    """The heap policy set in this process; None when glibc's defaults were left alone (or it is not glibc)."""
    return _heap_policy


@contextlib.contextmanager
def heap_policy_during(policy: str | None):
    """The one place a heap policy is set: `policy` inside the block (None: leave the heap as it is), the previous
    one after it. glibc's own dynamic threshold cannot be switched back on once fixed, so a process that had it
    leaves the block with "fast", which keeps blocks up to 32 MB in the heap as the dynamic threshold does."""
    before = _heap_policy
    if policy is None or before == policy:
        yield
        return
    set_heap_policy(policy)
    try:
        yield
    finally:
        set_heap_policy(before or "fast")


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


def _fresh_outputs(func, out) -> list:
    """The outputs of `func` that may hold new storage: not those its schema declares as aliases of an input (views
    such as a weight's transpose, in-place and out= results), whose storage existed before the op."""
    returns = getattr(getattr(func, "_schema", None), "returns", None)
    if returns is None:
        return tree_flatten(out)[0]
    parts = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
    fresh = [part for part, r in zip(parts, returns, strict=False) if r.alias_info is None]
    return tree_flatten(fresh)[0]


class TensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active, live and at peak. Deterministic, unlike RSS,
    and the same on any device; tensors that existed before entering (the weights) are not counted, nor are views
    of them (a weight's transpose in a linear map's forward is the weight's own storage)."""

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
        for t in _fresh_outputs(func, out):
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
