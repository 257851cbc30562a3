"""Measurement and heap tuning (slimtune/memory.py): TensorBytes counts the bytes of the storages created while it
is active (known allocations, by hand), not views nor tensors that existed before; the heap policies observed from
outside (resident memory after freeing a large block) and heap_policy_during's restoring of the previous policy,
each in a fresh process since the policy is process-wide and sticky; the peak-RSS window; and telling an
out-of-memory error from any other."""

import subprocess
import sys

import pytest
import torch

from slimtune.memory import TensorBytes, is_out_of_memory

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")


def _child(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    if lines and lines[-1] == "not glibc":
        pytest.skip("the C library is not glibc")
    return lines


# ---------------------------------------------------------------- TensorBytes


def test_tensor_bytes_counts_a_known_allocation():
    with TensorBytes() as counted:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.zeros(10, 20, dtype=torch.float64)  # 1600 bytes
        c = torch.ones(7, dtype=torch.int8)  # 7 bytes
    assert counted.sizes == [4000, 1600, 7]
    assert counted.live == counted.peak == 5607
    del a, b, c


def test_tensor_bytes_ignores_views_and_tensors_made_before():
    weight = torch.randn(64, 32)
    with TensorBytes() as counted:
        views = [weight.t(), weight[::2], weight.view(-1), weight[3], weight.reshape(32, 64), weight.expand(2, 64, 32)]
        weight.mul_(2.0)  # in place: the weight's own storage
        product = weight @ torch.ones(32)  # new: [64] float32 and the ones [32]
    assert sorted(counted.sizes) == sorted([32 * 4, 64 * 4])
    assert all(v.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for v in views)
    del product


def test_tensor_bytes_follows_frees_and_keeps_the_peak():
    with TensorBytes() as counted:
        big = torch.empty(2**20, dtype=torch.uint8)
        small = torch.empty(1000, dtype=torch.uint8)
        del big
        after_free = counted.live
        again = torch.empty(500, dtype=torch.uint8)
    assert after_free == 1000
    assert counted.live == 1500 and counted.peak == 2**20 + 1000
    del small, again


# ---------------------------------------------------------------- heap policies (moved from test_heap.py)

CHILD = r"""
import sys
import torch
from slimtune.memory import heap_policy, process_rss, set_heap_policy
assert heap_policy() is None
if not set_heap_policy(sys.argv[1]):
    print("not glibc"); sys.exit(0)
assert heap_policy() == sys.argv[1]
block = torch.ones(16 * 2**20 // 4)  # 16 MB: mmap'ed under tight (4 MB), heap under fast (32 MB)
before_free = process_rss()
del block
print(before_free - process_rss())
"""


@LINUX
def test_tight_returns_a_freed_block_at_once_and_fast_keeps_it_for_reuse():
    returned = {}
    for policy in ("tight", "fast"):
        out = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, check=True)
        if out.stdout.strip() == "not glibc":
            pytest.skip("the C library is not glibc")
        returned[policy] = int(out.stdout.strip().splitlines()[-1])
    assert returned["tight"] >= 15 * 2**20  # the 16 MB left resident memory when freed
    assert returned["fast"] <= 2**20  # kept by the heap


DURING = r"""
import torch
from slimtune.memory import heap_policy, heap_policy_during, process_rss, set_heap_policy

def freed_at_once():
    # A 16 MB block: returned to the OS when freed under tight (mmap'ed), kept by the heap under fast.
    block = torch.ones(16 * 2**20 // 4)
    before = process_rss()
    del block
    return before - process_rss() >= 15 * 2**20

if not set_heap_policy("fast"):
    print("not glibc"); raise SystemExit
# No block is freed before the one inside: a free 16 MB chunk left in the heap would be reused under any policy.
seen = [heap_policy()]
with heap_policy_during("tight"):
    seen += [heap_policy(), freed_at_once()]
    with heap_policy_during(None):  # None: leave the heap as it is
        seen += [heap_policy()]
    with heap_policy_during("tight"):  # the same policy again: nothing to change or restore
        seen += [heap_policy()]
    seen += [heap_policy()]
seen += [heap_policy(), freed_at_once()]
try:
    with heap_policy_during("tight"):
        raise KeyError("inside")
except KeyError:
    pass
seen += [heap_policy()]
print(seen)
"""

FROM_GLIBC = r"""
from slimtune.memory import heap_policy, heap_policy_during
seen = [heap_policy()]
with heap_policy_during("tight"):
    seen.append(heap_policy())
    if seen[-1] is None:
        print("not glibc"); raise SystemExit
seen.append(heap_policy())
print(seen)
"""


@LINUX
def test_heap_policy_during_restores_the_previous_policy():
    """Checked by heap_policy() and by what the allocator really does inside the block (a freed 16 MB block goes
    back to the OS at once) and after it (kept by the heap again); after an error inside it too."""
    seen = _child(DURING)[-1]
    assert seen == str(["fast", "tight", True, "tight", "tight", "tight", "fast", False, "fast"])


@LINUX
def test_leaving_glibcs_own_threshold_falls_back_to_fast():
    """glibc's dynamic threshold cannot be switched back on: a process that had it leaves the block with fast."""
    assert _child(FROM_GLIBC)[-1] == str([None, "tight", "fast"])


PEAK = r"""
import torch
from slimtune.memory import new_peak_window, peak_rss, process_rss, reset_peak_rss, window_peak_rss
block = torch.ones(200 * 10**6 // 4)  # 200 MB, touched
del block
if not new_peak_window():
    print("no clear_refs"); raise SystemExit
print(peak_rss(), window_peak_rss(), process_rss())
reset_peak_rss()
print(peak_rss())
"""


@LINUX
def test_a_new_peak_window_forgets_the_old_peak_but_peak_rss_keeps_it():
    lines = _child(PEAK)
    if lines[-1] == "no clear_refs":
        pytest.skip("the kernel does not let this process reset its peak RSS")
    peak, window, now = map(int, lines[0].split())
    after_reset = int(lines[1])
    assert peak >= now + 190 * 10**6  # the 200 MB block was resident once, and freed (mmap'ed: above 32 MB)
    assert window < peak - 150 * 10**6  # the window starts after the block
    assert window >= now * 0.9
    assert after_reset < peak - 150 * 10**6  # reset_peak_rss forgets the carried peak too


# ---------------------------------------------------------------- out of memory


def test_out_of_memory_is_told_from_other_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the allocator's RuntimeErrors


def test_a_real_cpu_allocation_failure_is_out_of_memory():
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: no machine has it
    assert is_out_of_memory(info.value)
