"""A run folder: metrics as JSON lines and the resumable state of a training run (weights, optimizer, schedule,
step, random-number states and data position, the run plan), written atomically; and a lock, so that two runs
never write one folder. Which settings a resumed run must share is declared with the options (options.py)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from .atomic import atomic_write, pid_alive
from .errors import SlimtuneError

try:  # POSIX; elsewhere the lock is a file created exclusively
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

STATE = "state.pt"
METRICS = "metrics.jsonl"
LOCK = "lock"


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None
        self._made: list[Path] = []  # the folders lock() created

    def _refuse(self, holder: str) -> SlimtuneError:
        return SlimtuneError(
            f"run folder {self.path} is in use by {holder or 'another process'}: wait for that run, "
            "or give another `run_dir`",
            params=("run_dir",),
        )

    def lock(self) -> None:
        """Hold the folder for this process until release(): a second run on it is refused. Taken before any other
        work on the folder (the check for a saved run included); a no-op when already held."""
        if self._lock is not None:
            return
        made = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._made = made[::-1]  # the folders lock() creates, outermost first
        self.path.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            self._lock_portable()
            return
        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise self._refuse(holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def _lock_portable(self) -> None:
        """Without flock: a lock file created exclusively, taken over when its process is gone."""
        path = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = path.read_text().strip() if path.exists() else ""
                pid = holder.removeprefix("pid ")
                if pid.isdigit() and pid_alive(int(pid)):
                    raise self._refuse(holder) from None
                path.unlink(missing_ok=True)  # a dead process's lock
                continue
            os.write(fd, f"pid {os.getpid()}".encode())
            os.close(fd)
            self._lock = path
            return
        raise self._refuse("")

    def release(self) -> None:
        """Let go of the folder; one this process made and left holding nothing but its lock is removed, so that a
        run refused before its first step leaves nothing behind."""
        if self._lock is None:
            return
        empty = bool(self._made) and [p.name for p in self.path.iterdir()] == [LOCK]
        if empty:
            (self.path / LOCK).unlink(missing_ok=True)
        if fcntl is None:
            Path(self._lock).unlink(missing_ok=True)
        else:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
        self._lock = None
        if empty:  # the folder and the parents lock() made for it, innermost first, each while it is empty
            for folder in reversed(self._made):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def log(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def has_state(self) -> bool:
        return (self.path / STATE).is_file()

    def summary(self) -> str:
        """Where the saved run stands, e.g. "stopped after step 17 of 30" or "finished: 30 of 30 steps"."""
        try:  # mmap: the weights are not read
            state = self._read(mmap=True)
            step, settings = state["step"], state["settings"]
            total = 1 if settings.get("one_step") else settings.get("steps")
        except Exception:
            return "a saved state that cannot be read"
        return f"finished: {step} of {total} steps" if step >= total else f"stopped after step {step} of {total}"

    def state_error(self) -> str | None:
        """Why the saved state cannot be read (the whole error, on one line), or None when it can."""
        try:
            self._read(mmap=True)
        except Exception as e:
            return _one_line(e)
        return None

    def _read(self, mmap: bool = False) -> dict:
        return torch.load(self.path / STATE, map_location="cpu", weights_only=True, mmap=mmap)

    def move_aside(self) -> Path:
        """Move what the folder holds to PATH.old-N (the first free N), keeping everything; the folder itself and
        its lock stay, so the run that holds it keeps holding it. Returns the new name."""
        n = 1
        while (aside := self.path.with_name(f"{self.path.name}.old-{n}")).exists():
            n += 1
        aside.mkdir()
        for entry in self.path.iterdir():
            if entry.name != LOCK:
                os.replace(entry, aside / entry.name)
        return aside

    def save(self, state: dict) -> None:
        """torch.save to a temporary file, fsync, rename: the previous state stays whole until the new one is."""
        try:
            with atomic_write(self.path / STATE) as tmp:
                torch.save(state, tmp)
        except OSError as e:
            raise SlimtuneError(
                f"cannot save the run state in {self.path} ({e.strerror or e}): free some space"
            ) from None

    def load(self) -> dict:
        """The saved state (the caller checks it against its settings)."""
        path = self.path / STATE
        if not path.is_file():
            raise SlimtuneError(
                f"nothing to `resume` in {self.path}: no {STATE} there; run without `resume`", params=("resume",)
            )
        try:
            return self._read()
        except Exception as e:
            raise SlimtuneError(
                f"cannot read the saved run state {path} ({_one_line(e)}): start over with `restart` (the unreadable "
                "state is moved aside, kept)",
                params=("restart",),
            ) from None


def _one_line(error: Exception) -> str:
    """An exception's whole message on one line: its lines joined, runs of blanks closed up."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
