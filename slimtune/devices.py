"""Devices and their memory: which device to run on, what it has free, the budget a job may use on it, the CUDA
context's share, an emulated small card; CPU memory from psutil and the process's memory cgroups (cgroups.py),
NVIDIA GPUs from NVML (`slimtune env`).

A budget covers everything the job holds on the device. On CPU that is the process's resident memory (RSS): the
runtime (Python, torch, the loaded checkpoint), the weights, gradients, optimizer state, one chunk's activations,
the recurrent states and the tokens. On CUDA it is what the job takes of the card: the CUDA context plus the
caching allocator's reserved memory.

CUDA device indices are not NVML indices: CUDA_VISIBLE_DEVICES renumbers and reorders the cards, and a MIG
slice is a device of its own. Cards are matched by UUID (torch reports it), and for a MIG slice, whose memory
NVML's parent-card figures do not describe, torch.cuda.mem_get_info gives the slice's own memory.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from .cgroups import Limit, memory_limits, tightest
from .errors import ConfigError
from .options import SAFETY_MARGIN
from .units import format_size, parse_budget, parse_size


@dataclass
class GPU:
    index: int  # the CUDA index torch uses in this process
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    mig: bool = False


@dataclass
class Environment:
    python: str
    torch: str
    cuda_version: str | None
    cuda_usable: bool
    cpu_count: int
    cpu_total_bytes: int
    cpu_available_bytes: int  # what a process may add: the least of the system's available and its cgroups' free
    cpu_limit: str = ""  # where cpu_available_bytes comes from (a cgroup limit, or the system's available memory)
    gpus: list[GPU] = field(default_factory=list)
    nvml_error: str | None = None
    default_device: str = "cpu"

    def to_json(self) -> dict:
        return asdict(self)


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library, or no permission: NVML is optional
        return None


def _normalise_uuid(uuid) -> str:
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    return text.lower().removeprefix("gpu-").removeprefix("mig-")


def nvml_memory_by_uuid(nvml) -> dict[str, tuple[str, int, int]]:
    """{uuid: (name, total, free)} for every card NVML sees (whole cards; MIG slices are not listed)."""
    found = {}
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        found[_normalise_uuid(nvml.nvmlDeviceGetUUID(handle))] = (
            name.decode() if isinstance(name, bytes) else name,
            int(mem.total),
            int(mem.free),
        )
    return found


def detect_gpus() -> tuple[list[GPU], str | None]:
    """The CUDA devices this process can use, each with its memory; and why NVML was not used, if it was not."""
    if not torch.cuda.is_available():
        return [], None
    nvml = _nvml()
    by_uuid = nvml_memory_by_uuid(nvml) if nvml else {}
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = _normalise_uuid(getattr(props, "uuid", ""))
        if uuid in by_uuid:
            name, total, free = by_uuid[uuid]
            gpus.append(GPU(index, name, uuid, total, free))
        else:  # a MIG slice, or NVML unavailable: ask the CUDA runtime about this device itself
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(GPU(index, props.name, uuid, total, free, mig="MIG" in props.name or bool(by_uuid)))
    return gpus, None if nvml else "NVML not available; memory read from the CUDA runtime"


def nvml_other_processes_bytes(device: torch.device) -> int:
    """Bytes that other processes hold on `device`'s card (0 when NVML cannot tell)."""
    nvml = _nvml()
    if nvml is None:
        return 0
    try:
        uuid = _normalise_uuid(torch.cuda.get_device_properties(device).uuid)
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            if _normalise_uuid(nvml.nvmlDeviceGetUUID(handle)) == uuid:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                return sum(int(p.usedGpuMemory or 0) for p in procs if p.pid != os.getpid())
    except Exception:
        return 0
    return 0


def detect_environment() -> Environment:
    vm = psutil.virtual_memory()
    host = host_memory()
    gpus, nvml_error = detect_gpus()
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_version=torch.version.cuda,
        cuda_usable=torch.cuda.is_available(),
        cpu_count=psutil.cpu_count() or 1,
        cpu_total_bytes=vm.total,
        cpu_available_bytes=host.free_bytes,
        cpu_limit=host.source,
        gpus=gpus,
        nvml_error=nvml_error,
        default_device="cuda" if torch.cuda.is_available() else "cpu",
    )


def resolve_device(name: str | torch.device) -> torch.device:
    """auto -> cuda when usable, else cpu. Raises ConfigError for a device that is not there."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"`device` {name}: no usable CUDA device here; use `device=cpu` (or auto)", params=("device",)
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"`device` {name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..", params=("device",)
            )
        return device
    raise ConfigError(f"`device` must be auto, cpu or cuda, got {name!r}", params=("device",))


def cuda_context_bytes(device: torch.device) -> int:
    """What the CUDA context itself holds: memory used on the card beyond what the allocator reserved
    (exact when this process is alone on the card)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device) - nvml_other_processes_bytes(device))


@dataclass(frozen=True)
class HostMemory:
    """What a CPU process may hold: the least of its resident memory plus the system's available memory and the
    room the memory cgroups it runs in (a container's, a pod's, a systemd slice's; cgroups.py) leave it."""

    free_bytes: int  # what it may still add to its resident memory
    system_available_bytes: int
    limit: Limit | None  # the tightest cgroup limit, if any
    resident_bytes: int = 0  # what it holds now (RSS)
    own_bytes: int = 0  # of that, what a cgroup charges as not reclaimable: anonymous and shared memory

    @property
    def total_bytes(self) -> int:
        """What the process may hold in all: its resident memory plus what it may add."""
        return self.resident_bytes + self.free_bytes

    @property
    def source(self) -> str:
        """Where the ceiling comes from, for `env` and `plan`."""
        system = self.resident_bytes + self.system_available_bytes
        if self.limit is not None and self.limit.room(self.own_bytes) < system:
            return self.limit.describe()
        return "the system's available memory" + (f"; {self.limit.describe()}" if self.limit else ", no cgroup limit")


def own_memory() -> tuple[int, int]:
    """(resident bytes, of them anonymous and shared: what a memory cgroup cannot reclaim) of this process, from
    /proc/self/status (RssAnon + RssShmem); elsewhere psutil's RSS less its shared pages."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssShmem"):
                fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        fields = {}
    if "VmRSS" in fields and "RssAnon" in fields:
        return fields["VmRSS"], fields["RssAnon"] + fields.get("RssShmem", 0)
    info = psutil.Process().memory_info()
    return info.rss, max(0, info.rss - getattr(info, "shared", 0))


def host_memory() -> HostMemory:
    resident, own = own_memory()
    system = psutil.virtual_memory().available
    limit = tightest(memory_limits(), own)
    total = resident + system if limit is None else min(resident + system, limit.room(own))
    return HostMemory(max(0, total - resident), system, limit, resident, own)


def available_bytes(device: torch.device) -> int:
    """What this job could hold in all: on CPU its resident memory plus what it may still add (the least of the
    system's available memory and the room its cgroups leave it, `host_memory`); on CUDA the card's free memory plus
    what this process already reserved."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) + cuda_context_bytes(device)
    return host_memory().total_bytes


def available_source(device: torch.device) -> str:
    """Where `available_bytes` comes from on `device`."""
    return "the card's free memory" if device.type == "cuda" else host_memory().source


def resolve_budget(budget: str | int | None, device: torch.device) -> tuple[int, int]:
    """(effective budget, available): the smaller of the user's budget and what is free. `budget` is a size,
    a percentage of the available memory ('80%'), or None for the available memory less a safety margin."""
    available = available_bytes(device)
    if budget is None:
        return int(available * (1 - SAFETY_MARGIN)), available
    size, share = parse_budget(budget)
    return (int(available * share) if share is not None else min(size, available)), available


def emulate_card(size: str | int, device: torch.device) -> int:
    """Make this process see a CUDA card of `size` bytes in all (e.g. 2GB for a small card): the caching
    allocator is capped (torch.cuda.set_per_process_memory_fraction) at `size` less the CUDA context this
    process already holds, as the context takes its share of a real small card too. Returns the allocator cap."""
    if device.type != "cuda":
        raise ConfigError(
            f"`emulate_memory` caps a CUDA card, but this run is on {device}: drop it or use `device=cuda`",
            params=("emulate_memory", "device"),
        )
    wanted = parse_size(size, "emulate_memory")
    torch.zeros(1, device=device)  # creates the context, so that its size can be read
    total = torch.cuda.get_device_properties(device).total_memory
    cap, fraction = emulated_cap(wanted, cuda_context_bytes(device), total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return cap


def emulated_cap(wanted: int, context: int, total: int) -> tuple[int, float]:
    """(allocator cap, its fraction of the card) that makes a card of `total` bytes act as one of `wanted` bytes
    for a process whose CUDA context holds `context`: the context takes its share of a real small card too.
    Raises ConfigError unless the context < wanted < total."""
    cap = wanted - context
    if cap <= 0 or wanted >= total:
        raise ConfigError(
            f"`emulate_memory` {format_size(wanted)} must lie between the CUDA context ({format_size(context)}) "
            f"and the card's {format_size(total)}",
            params=("emulate_memory",),
        )
    return cap, cap / total
