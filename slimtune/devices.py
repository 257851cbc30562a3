"""Device detection for `slimtune env`, `plan` and `fit`: CPU memory from psutil, NVIDIA GPUs from NVML.

CUDA device indices are not NVML indices: CUDA_VISIBLE_DEVICES renumbers and reorders the cards, and a MIG
slice is a device of its own. Cards are matched by UUID (torch reports it), and for a MIG slice, whose memory
NVML's parent-card figures do not describe, torch.cuda.mem_get_info gives the slice's own memory.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

import psutil
import torch


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
    cpu_available_bytes: int
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
    gpus, nvml_error = detect_gpus()
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_version=torch.version.cuda,
        cuda_usable=torch.cuda.is_available(),
        cpu_count=psutil.cpu_count() or 1,
        cpu_total_bytes=vm.total,
        cpu_available_bytes=vm.available,
        gpus=gpus,
        nvml_error=nvml_error,
        default_device="cuda" if torch.cuda.is_available() else "cpu",
    )
