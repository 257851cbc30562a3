"""The heap policies (memory.set_heap_policy), observed from outside: resident memory after freeing a large
block, in a fresh process (the policy is process-wide and sticky)."""

import subprocess
import sys

import pytest

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tight_returns_a_freed_block_at_once_and_fast_keeps_it_for_reuse():
    returned = {}
    for policy in ("tight", "fast"):
        out = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, check=True)
        if out.stdout.strip() == "not glibc":
            pytest.skip("the C library is not glibc")
        returned[policy] = int(out.stdout.strip().splitlines()[-1])
    assert returned["tight"] >= 15 * 2**20  # the 16 MB left resident memory when freed
    assert returned["fast"] <= 2**20  # kept by the heap
