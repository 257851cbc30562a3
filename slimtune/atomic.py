"""Atomic writes of files and folders: a crash (kill -9, power loss) leaves the previous version or the new one
at the destination, never half of one.

`atomic_write(path)` yields a temporary name beside `path` (`.NAME.tmp-PID`, a file name, or an empty folder with
`folder=True`); when the block ends cleanly its contents are fsynced and moved into place. A file moves with one
rename. A folder that already exists is swapped with the new one in one step where the system allows it (Linux
renameat2 RENAME_EXCHANGE), and the old one, now under the temporary name, is removed; elsewhere the old folder is
first renamed to `.NAME.old-PID`, and should the process die before the new one is in place, the next write (or
`sweep`) puts the old one back. Temporary and old copies left by dead processes are swept before each write.
New files and folders get the usual permissions (0666 / 0777 less the umask), like any other file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _stage(name: str) -> None:
    """Called at each stage of a write ("written", "swapped"); tests replace it to kill the process there."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (True where the system cannot tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process, or a system that cannot tell
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(path: str | os.PathLike) -> None:
    """Clear what dead writers left beside `path`; if `path` itself is missing because a writer died between
    moving the old folder aside and moving the new one in, put the old one back."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in sorted(path.parent.glob(f".{path.name}.*-*")):
        kind, _, pid = stale.name[len(path.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # a live writer's; this process's own are leftovers of an earlier, failed write
        if kind == "old" and not path.exists():
            os.replace(stale, path)
        else:
            _remove(stale)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some systems cannot fsync a folder
    finally:
        os.close(fd)


def _settle(path: Path) -> None:
    """fsync every file under `path` (and the folders), with ordinary permissions."""
    mask = _umask()
    entries = [path] + (sorted(path.rglob("*"), reverse=True) if path.is_dir() else [])
    for entry in entries:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)
        _fsync(entry)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2). False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _move_into_place(tmp: Path, path: Path) -> None:
    if not (tmp.is_dir() and path.is_dir()):
        os.replace(tmp, path)
        _stage("swapped")
        return
    if _exchange(tmp, path):
        _stage("swapped")  # the new folder is in place; the old one sits at the temporary name
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    _stage("swapped")
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Write `path` atomically: write to the yielded temporary path (an empty folder when `folder`), and it is
    moved into place when the block ends without an error; after an error nothing changes at `path`.

    Example:
        with atomic_write("tuned.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        _settle(tmp)
        _stage("written")
        _move_into_place(tmp, path)
        _fsync(path.parent)
    finally:
        _remove(tmp)
