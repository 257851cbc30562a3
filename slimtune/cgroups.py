"""The memory a process may really hold on Linux: the limits of its own memory cgroup and of every ancestor.

A container (`docker run --memory 700m`), a Kubernetes pod, a systemd slice or a CI runner caps a process's memory
through its cgroup, and the kernel kills the process at that cap however much memory the host has free. The
process's cgroup is read from /proc/self/cgroup, where its hierarchy is mounted from /proc/self/mountinfo:
- cgroup v2 (one unified hierarchy): each level's `memory.max`, and `memory.high` where set lower (above it the
  kernel throttles and reclaims hard), against `memory.current`;
- cgroup v1 (the `memory` controller's hierarchy): each level's `memory.limit_in_bytes` against
  `memory.usage_in_bytes`.
Both usage figures count the page cache. Its file pages (`active_file` + `inactive_file`, v1 `total_active_file` +
`total_inactive_file`, in `memory.stat`) are what the kernel can take back under the limit; the rest (anonymous
memory, shared memory, the kernel's own) cannot be reclaimed: that is what a level's `used` counts. A process's own
file-backed pages (torch's libraries, a mapped checkpoint or data file) are in its resident memory and on those
file lists: they are counted once, in the process's share (`Limit.room`), so that a budget leaves them their room
and the run does not thrash at the limit. A limit at or above UNLIMITED is no limit (v1 writes "no limit" as the
largest page-aligned 64-bit number).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .units import format_size

UNLIMITED = 2**60


@dataclass(frozen=True)
class Limit:
    """One cgroup level's cap: `limit` bytes in all, `used` of them taken and not reclaimable (the file pages of the
    page cache excluded), by this process and everything else in that cgroup; `where`: the file the limit was read
    from."""

    limit: int
    used: int
    where: str
    version: int  # 1 or 2

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)

    def room(self, own: int) -> int:
        """What a process of this cgroup may hold in all (its resident memory, file-backed pages included) when
        `own` bytes of `used` are its own (its anonymous and shared memory): the limit less what the rest of the
        cgroup holds and cannot give back. Each page counted once."""
        return max(0, self.limit - max(0, self.used - own))

    def describe(self) -> str:
        return f"cgroup v{self.version} limit {format_size(self.limit)} ({self.where}), {format_size(self.free)} free"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 <= value < UNLIMITED else None


def _stat(folder: Path, key: str) -> int:
    for line in (_read(folder / "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _number(value) or 0
    return 0


def _mounts(mountinfo: Path) -> list[tuple[str, str, str, str]]:
    """(root inside the hierarchy, mount point, file system type, super options) of each cgroup mount."""
    found = []
    for line in (_read(mountinfo) or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        found.append((fields[3], fields[4].replace("\\040", " "), tail[0], tail[2]))
    return found


def _folders(path: str, root: str, mount_point: str) -> list[Path]:
    """The process's cgroup folder and its ancestors' up to the mount's root, innermost first."""
    rel = path
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        rel = path[len(root.rstrip("/")) :]  # the mount shows the hierarchy from `root` down
    parts = [p for p in rel.split("/") if p and p != ".."]
    base = Path(mount_point)
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_limits(folder: Path) -> list[Limit]:
    current = _number(_read(folder / "memory.current"))
    if current is None:
        return []
    used = max(0, current - _stat(folder, "active_file") - _stat(folder, "inactive_file"))
    limits = []
    for name in ("memory.max", "memory.high"):
        value = _number(_read(folder / name))
        if value is not None:
            limits.append(Limit(value, used, str(folder / name), 2))
    return limits


def _v1_limits(folder: Path) -> list[Limit]:
    value = _number(_read(folder / "memory.limit_in_bytes"))
    usage = _number(_read(folder / "memory.usage_in_bytes"))
    if value is None or usage is None:
        return []
    used = max(0, usage - _stat(folder, "total_active_file") - _stat(folder, "total_inactive_file"))
    return [Limit(value, used, str(folder / "memory.limit_in_bytes"), 1)]


def memory_limits(proc: str | os.PathLike = "/proc/self") -> list[Limit]:
    """Every memory limit on this process's cgroup and its ancestors (v1 and v2), innermost first; [] where there
    is none or the files cannot be read (not Linux, no cgroup file system mounted)."""
    proc = Path(proc)
    membership = []
    for line in (_read(proc / "cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        membership.append((hierarchy, controllers.split(","), path))
    limits: list[Limit] = []
    for root, mount_point, fstype, options in _mounts(proc / "mountinfo"):
        for hierarchy, controllers, path in membership:
            if fstype == "cgroup2" and hierarchy == "0" and controllers == [""]:
                read = _v2_limits
            elif fstype == "cgroup" and "memory" in controllers and "memory" in options.split(","):
                read = _v1_limits
            else:
                continue
            for folder in _folders(path, root, mount_point):
                limits.extend(read(folder))
    return limits


def tightest(limits: list[Limit], own: int = 0) -> Limit | None:
    """The limit that leaves a process owning `own` bytes of each level's `used` the least room, or None."""
    return min(limits, key=lambda limit: limit.room(own), default=None)
