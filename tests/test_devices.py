"""Devices and their memory (slimtune/devices.py): which device a name means and the errors naming `device`; the
budget a job may use, from a size, a share of the available memory or the default safety margin, each computed
here by hand from a faked available figure; the host memory a CPU process may add under cgroup limits (faked) and
where that figure comes from; card UUIDs as NVML and torch write them; and emulating a small card only on CUDA.
(Matching CUDA devices to NVML cards and MIG slices is tested in test_planner.py.)"""

import types

import pytest
import torch

from slimtune import devices
from slimtune.cgroups import Limit
from slimtune.devices import (
    SAFETY_MARGIN,
    HostMemory,
    available_bytes,
    emulate_card,
    host_memory,
    resolve_budget,
    resolve_device,
)
from slimtune.errors import ConfigError

CPU = torch.device("cpu")
MB = 10**6


def test_device_names():
    assert resolve_device("cpu") == CPU and resolve_device(CPU) == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "CPU", "", "mps"):
        with pytest.raises(ConfigError, match="`device` must be auto, cpu or cuda") as info:
            resolve_device(bad)
        assert info.value.params == ("device",)


def test_cuda_where_there_is_none_or_not_that_many(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match="no usable CUDA device here") as info:
        resolve_device("cuda:0")
    assert info.value.params == ("device",)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\)") as info:
        resolve_device("cuda:2")
    assert info.value.params == ("device",)


@pytest.fixture
def ten_gb(monkeypatch):
    """A machine where this job could hold 10 GB in all."""
    monkeypatch.setattr(devices, "available_bytes", lambda device: 10 * 10**9)
    return 10 * 10**9


@pytest.mark.parametrize(
    "budget, expected",
    [
        (None, 9 * 10**9),  # 10 GB less the 10 % safety margin
        ("50%", 5 * 10**9),
        (" 12.5% ", 1_250_000_000),
        ("100%", 10 * 10**9),
        ("2GB", 2 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("64GB", 10 * 10**9),  # capped at what is available
        (10**6, 10**6),
    ],
)
def test_the_budget_by_hand(ten_gb, budget, expected):
    assert SAFETY_MARGIN == 0.10
    assert resolve_budget(budget, CPU) == (expected, ten_gb)


@pytest.mark.parametrize("bad", ["0%", "150%", "x%", "-5%", "%"])
def test_a_bad_share_names_mem_budget(ten_gb, bad):
    with pytest.raises(ConfigError, match="mem_budget") as info:
        resolve_budget(bad, CPU)
    assert info.value.params == ("mem_budget",)


def test_a_bad_size_is_refused(ten_gb):
    with pytest.raises(ConfigError, match="cannot read `mem_budget` 'lots'") as caught:
        resolve_budget("lots", CPU)
    assert caught.value.params == ("mem_budget",)  # the CLI names --mem-budget


def _fake_host(monkeypatch, system_available, limits, resident=0, own=0):
    monkeypatch.setattr(devices.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=system_available))
    monkeypatch.setattr(devices, "memory_limits", lambda: limits)
    monkeypatch.setattr(devices, "own_memory", lambda: (resident, own))


def test_host_memory_is_the_least_of_the_system_and_the_tightest_cgroup(monkeypatch):
    pod = Limit(2000 * MB, 1900 * MB, "/sys/fs/cgroup/pod/memory.max", 2)  # 100 MB free
    job = Limit(700 * MB, 300 * MB, "/sys/fs/cgroup/pod/job/memory.max", 2)  # 400 MB free
    _fake_host(monkeypatch, 5000 * MB, [job, pod])
    host = host_memory()
    assert (host.free_bytes, host.system_available_bytes, host.limit) == (100 * MB, 5000 * MB, pod)
    assert host.source == pod.describe() and "pod/memory.max" in host.source
    _fake_host(monkeypatch, 50 * MB, [job, pod])  # the system has less than the cgroups leave
    host = host_memory()
    assert host.free_bytes == 50 * MB
    assert host.source == "the system's available memory; " + pod.describe()
    _fake_host(monkeypatch, 50 * MB, [])
    assert host_memory() == HostMemory(50 * MB, 50 * MB, None)
    assert host_memory().source == "the system's available memory, no cgroup limit"


def test_in_a_cgroup_the_process_may_hold_the_limit_less_what_the_rest_holds_each_page_counted_once(monkeypatch):
    """A 786 MB container whose cgroup holds 500 MB that cannot be reclaimed, 300 MB of it this process's own
    anonymous memory; the process's resident memory is 450 MB, 150 MB of it file-backed (libraries, a mapped
    checkpoint: on the cgroup's file lists, not in `used`). It may hold 786 - (500 - 300) = 586 MB in all: the
    file pages it has are inside that, not added to it (RSS + the limit's free memory would say 450 + 286 =
    736 MB), and it may add 136 MB."""
    box = Limit(786 * MB, 500 * MB, "/sys/fs/cgroup/memory/box/memory.limit_in_bytes", 1)
    _fake_host(monkeypatch, 20_000 * MB, [box], resident=450 * MB, own=300 * MB)
    host = host_memory()
    assert host.total_bytes == 586 * MB and host.free_bytes == 136 * MB
    assert available_bytes(CPU) == 586 * MB <= box.limit
    assert host.source == box.describe()
    _fake_host(monkeypatch, 20_000 * MB, [box], resident=450 * MB, own=600 * MB)  # charged elsewhere: no credit
    assert host_memory().total_bytes == 786 * MB


def test_available_bytes_on_cpu_is_resident_memory_plus_what_may_be_added(monkeypatch):
    rss = devices.psutil.Process().memory_info().rss
    monkeypatch.setattr(devices, "host_memory", lambda: HostMemory(123 * MB, 999 * MB, None, rss))
    assert available_bytes(CPU) == rss + 123 * MB
    resident, own = devices.own_memory()  # /proc/self/status, against psutil's figure
    assert abs(resident - devices.psutil.Process().memory_info().rss) < 50 * MB and 0 < own <= resident


def test_uuids_are_compared_without_their_prefix_and_case():
    assert devices._normalise_uuid("GPU-AbC-123") == "abc-123"
    assert devices._normalise_uuid(b"MIG-dddd") == "dddd"
    assert devices._normalise_uuid("cccc") == "cccc"


def test_no_cuda_means_no_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.detect_gpus() == ([], None)
    env = devices.detect_environment()
    assert env.gpus == [] and env.default_device == "cpu" and env.cuda_usable is False
    assert env.cpu_count >= 1 and 0 < env.cpu_available_bytes <= env.cpu_total_bytes
    assert set(env.to_json()) >= {"python", "torch", "cpu_count", "cpu_available_bytes", "gpus", "cpu_limit"}


def test_emulating_a_card_needs_cuda():
    with pytest.raises(ConfigError, match="caps a CUDA card") as info:
        emulate_card("2GB", CPU)
    assert info.value.params == ("emulate_memory", "device")


@pytest.mark.parametrize(
    "wanted, context, total, cap",
    [
        (2 * 10**9, 500 * 2**20, 141 * 10**9, 2 * 10**9 - 500 * 2**20),  # 2GB on an H200, a 500 MiB context
        (4 * 2**30, 0, 80 * 2**30, 4 * 2**30),
    ],  # fmt: skip
)
def test_an_emulated_card_leaves_the_context_its_share(wanted, context, total, cap):
    got, fraction = devices.emulated_cap(wanted, context, total)
    assert got == cap and fraction * total == pytest.approx(cap, rel=1e-12)


@pytest.mark.parametrize(
    "wanted, context, total", [(400 * 2**20, 500 * 2**20, 80 * 2**30), (81 * 2**30, 500 * 2**20, 80 * 2**30)]
)
def test_an_emulated_card_must_lie_between_the_context_and_the_card(wanted, context, total):
    with pytest.raises(ConfigError, match="between the CUDA context") as info:
        devices.emulated_cap(wanted, context, total)
    assert info.value.params == ("emulate_memory",)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_real_card():
    cuda = resolve_device("cuda:0")
    free, total = torch.cuda.mem_get_info(cuda)
    room = available_bytes(cuda)
    assert free <= room <= total
    budget, available = resolve_budget("50%", cuda)
    assert abs(budget - available / 2) <= 0.02 * available
    with pytest.raises(ConfigError, match="emulate_memory"):
        emulate_card(total + 10**9, cuda)  # larger than the card
