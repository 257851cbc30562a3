"""A run folder: metrics as JSON lines and the resumable state of a training run (weights, optimizer,
schedule, step, random-number states and data position, chunk size), written atomically."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import torch

from .checkpoint import temporary_path
from .errors import SlimtuneError

STATE = "state.pt"
METRICS = "metrics.jsonl"
# Settings a resumed run must share with the run it continues, or it would not be the same run.
RESUME_KEYS = ("seq_len", "batch_size", "steps", "optimizer", "lr", "schedule", "warmup", "accumulate", "seed", "task",
               "precision", "world_size")


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None

    def lock(self) -> None:
        """Hold the folder for this process until release(): a second run on it is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / "lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SlimtuneError(
                f"run folder {self.path} is in use by {holder}: wait for that run, or pass another --run-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def log(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, state: dict) -> None:
        """torch.save to a temporary file, fsync, rename: the previous state stays whole until the new one is."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / STATE
        tmp = temporary_path(target)
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            raise SlimtuneError(f"cannot save the run state in {self.path} ({e.strerror or e}): free some space") from None
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, settings: dict) -> dict:
        """The saved state, checked against this run's settings."""
        path = self.path / STATE
        if not path.is_file():
            raise SlimtuneError(f"nothing to resume in {self.path}: no {STATE} there; run without --resume")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SlimtuneError(f"cannot read {path} ({str(e).splitlines()[0][:120]}): run without --resume") from None
        changed = [k for k in RESUME_KEYS if state["settings"].get(k) != settings.get(k)]
        if changed:
            was = ", ".join(f"{k} {state['settings'].get(k)!r} (now {settings.get(k)!r})" for k in changed)
            raise SlimtuneError(f"the run in {self.path} was started with {was}: resume with the same settings")
        return state
