"""The memory a process may hold under a container's limit: cgroup v1 and v2 files faked in a folder, and a real
cgroup made for the test where the machine lets root make one."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.cgroups import memory_limits, tightest
from slimtune.options import SAFETY_MARGIN

MB = 10**6


def _write(folder: Path, **files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(f"{text}\n")


def _proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    return proc


def _v2_mount(point: Path, root: str = "/") -> str:
    return f"41 31 0:38 {root} {point} rw,relatime - cgroup2 cgroup2 rw"


def _v1_mount(point: Path, controllers: str = "memory", root: str = "/") -> str:
    return f"35 31 0:32 {root} {point} rw,relatime - cgroup cgroup rw,{controllers}"


def test_v2_limit_of_the_process_cgroup_less_its_usage_and_reclaimable_cache(tmp_path):
    fs = tmp_path / "fs"
    stat = f"anon 1\nactive_file {30 * MB}\ninactive_file {50 * MB}\nshmem {10 * MB}"
    _write(fs / "app", memory__max=700 * MB, memory__current=300 * MB, memory__stat=stat)
    proc = _proc(tmp_path, "0::/app\n", [_v2_mount(fs)])
    (limit,) = memory_limits(proc)
    assert (limit.limit, limit.used, limit.version) == (700 * MB, 220 * MB, 2)  # file pages reclaimable, shmem not
    assert limit.free == 480 * MB
    assert limit.room(own=200 * MB) == 680 * MB  # the process's own 200 MB are inside its room, not counted twice
    assert limit.where.endswith("app/memory.max")


def test_v2_nested_the_tightest_ancestor_wins_and_memory_high_counts(tmp_path):
    fs = tmp_path / "fs"
    _write(fs, memory__stat="inactive_file 0")  # the root cgroup has no memory.max
    _write(fs / "pod", memory__max=2000 * MB, memory__current=1800 * MB)  # a sibling uses most of the pod
    _write(fs / "pod" / "job", memory__max="max", memory__high=900 * MB, memory__current=100 * MB)
    proc = _proc(tmp_path, "0::/pod/job\n", [_v2_mount(fs)])
    limits = memory_limits(proc)
    assert sorted(lim.limit for lim in limits) == [900 * MB, 2000 * MB]  # "max" is no limit
    best = tightest(limits)
    assert best.free == 200 * MB and "pod/memory.max" in best.where


def test_v2_unlimited_everywhere_is_no_limit(tmp_path):
    fs = tmp_path / "fs"
    _write(fs / "user.slice", memory__max="max", memory__high="max", memory__current=5 * MB)
    proc = _proc(tmp_path, "0::/user.slice\n", [_v2_mount(fs)])
    assert memory_limits(proc) == [] and tightest([]) is None


def test_v1_memory_controller_with_ancestors_and_a_mount_rooted_at_the_container(tmp_path):
    fs = tmp_path / "memory"
    no_limit = 9223372036854771712  # v1's "no limit"
    _write(fs, memory__limit_in_bytes=no_limit, memory__usage_in_bytes=8000 * MB)
    _write(
        fs / "inner",
        memory__limit_in_bytes=600 * MB,
        memory__usage_in_bytes=250 * MB,
        memory__stat=f"cache 1\ntotal_active_file {20 * MB}\ntotal_inactive_file {30 * MB}",
    )
    # Inside a container the mount shows the hierarchy from the container's own cgroup down.
    proc = _proc(
        tmp_path,
        "12:pids:/docker/abc\n4:memory:/docker/abc/inner\n1:name=systemd:/docker/abc\n0::/\n",
        [_v1_mount(tmp_path / "cpu", "cpu"), _v1_mount(fs, "memory", root="/docker/abc")],
    )
    (limit,) = memory_limits(proc)
    assert (limit.limit, limit.used, limit.version) == (600 * MB, 200 * MB, 1)
    assert limit.where == str(fs / "inner" / "memory.limit_in_bytes")


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert memory_limits(tmp_path / "missing") == []
    proc = _proc(tmp_path, "0::/gone\n", [_v2_mount(tmp_path / "nowhere")])
    assert memory_limits(proc) == []


def _own_cgroup(limit: int) -> Path | None:
    """A v1 memory cgroup made for this test, or None where root cannot make one (v2 is not tried: enabling its
    memory controller would change cgroups this test did not create)."""
    root = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        return None
    folder = root / f"slimtune-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        if folder.exists():
            folder.rmdir()
        return None
    return folder


def _drop_page_cache() -> None:
    """As a container that has just started sees it: no file page cached (root only; a no-op elsewhere)."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        pass


def test_fit_without_a_budget_stays_inside_a_real_cgroup_limit_from_a_cold_cache(tmp_path, data_dir):
    """The default budget is the cgroup's room, not the host's, and counts no page twice: from a cold page cache
    (where the process's freshly mapped libraries sit on the cgroup's file lists and were counted as free besides
    being in its RSS, 983 MB available in a 786 MB cgroup), what the plan takes as available stays within the
    limit, and the run's whole peak (VmHWM) within its budget."""
    limit = 600 * MB
    folder = _own_cgroup(limit)
    if folder is None:
        pytest.skip("cannot make a memory cgroup here (needs root and a writable cgroup v1 memory hierarchy)")
    try:
        ckpt = save_model(
            tmp_path / "m.safetensors", tiny_model(dtype=torch.float32, hidden_dim=128, n_layers=2, ffn_dim=512)
        )
        data = data_dir / "tinyshakespeare.txt"
        cmd = [
            sys.executable, "-m", "slimtune", "fit", "--checkpoint", str(ckpt), "--data", str(data),
            "--out", str(tmp_path / "o.safetensors"), "--seq-len", "65536", "--steps", "1", "--device", "cpu", "--json",
        ]  # fmt: skip
        join = f'echo $$ > {folder}/cgroup.procs && exec "$@"'
        _drop_page_cache()
        proc = subprocess.run(["sh", "-c", join, "sh", *cmd], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        plan = result["plan"]
        assert result["chunk_size"] < 65536  # full backprop at 64k tokens would need far more than 600 MB
        assert folder.name in plan["available_source"]  # the budget came from the cgroup, not the host
        assert plan["available_bytes"] <= limit
        assert plan["budget_bytes"] <= limit * (1 - SAFETY_MARGIN) + MB
        assert result["peak_memory_bytes"] <= plan["budget_bytes"]
    finally:
        folder.rmdir()
