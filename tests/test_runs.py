"""A run folder (slimtune/runs.py): the lock refuses a second holder (another RunFolder in this process, or another
process) until it is released; releasing a folder the lock created and that holds nothing else removes it; moving
a saved run aside keeps everything and the lock; metrics are JSON lines; the state saves and loads, and what stands
in a saved run is summarised; a missing or unreadable state is refused naming `resume`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.runs import LOCK, METRICS, STATE, RunFolder


def test_second_run_on_the_same_folder_is_refused(tmp_path):  # moved from test_workflow.py
    first, second = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run")
    first.lock()
    with pytest.raises(SlimtuneError, match="in use by pid"):
        second.lock()
    first.release()
    second.lock()
    second.release()


def test_the_refusal_names_the_holder_and_run_dir(tmp_path):
    first, second = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run")
    first.lock()
    first.lock()  # a no-op when already held
    try:
        with pytest.raises(SlimtuneError) as info:
            second.lock()
        assert "in use" in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert info.value.params == ("run_dir",)
        assert (tmp_path / "run" / LOCK).read_text() == f"pid {os.getpid()}"
    finally:
        first.release()


HOLD = r"""
import sys
from slimtune.runs import RunFolder
folder = RunFolder(sys.argv[1])
folder.lock()
print("locked", flush=True)
sys.stdin.readline()
folder.release()
"""


def test_another_process_holding_the_folder_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SlimtuneError, match=f"in use by pid {holder.pid}"):
            RunFolder(tmp_path / "run").lock()
    finally:
        holder.communicate("\n", timeout=60)
    mine = RunFolder(tmp_path / "run")
    mine.lock()  # free again once that process let go
    mine.release()


def test_release_removes_a_folder_the_lock_made_and_left_empty(tmp_path):
    made = RunFolder(tmp_path / "deep" / "run")
    made.lock()
    assert (tmp_path / "deep" / "run" / LOCK).is_file()
    made.release()
    assert not (tmp_path / "deep" / "run").exists()
    made.release()  # a no-op when not held


def test_release_keeps_a_folder_with_anything_in_it_or_that_existed(tmp_path):
    used = RunFolder(tmp_path / "used")
    used.lock()
    used.log({"step": 1})
    used.release()
    assert (tmp_path / "used" / METRICS).is_file()
    (tmp_path / "existing").mkdir()
    existing = RunFolder(tmp_path / "existing")
    existing.lock()
    existing.release()
    assert (tmp_path / "existing").is_dir()  # the lock did not create it: not this process's to remove


def test_move_aside_keeps_everything_and_the_lock(tmp_path):
    path = tmp_path / "run"
    folder = RunFolder(path)
    folder.lock()
    folder.save({"step": 3, "settings": {"steps": 5}})
    folder.log({"step": 3, "loss": 1.5})
    (path / "notes").mkdir()
    saved, metrics = (path / STATE).read_bytes(), (path / METRICS).read_text()
    aside = folder.move_aside()
    assert aside == tmp_path / "run.old-1"
    assert (aside / STATE).read_bytes() == saved and (aside / METRICS).read_text() == metrics
    assert (aside / "notes").is_dir() and not (aside / LOCK).exists()
    assert sorted(p.name for p in path.iterdir()) == [LOCK] and not folder.has_state()
    with pytest.raises(SlimtuneError, match="in use"):  # still held
        RunFolder(path).lock()
    folder.log({"step": 1})
    assert folder.move_aside() == tmp_path / "run.old-2"  # the first free N
    assert (tmp_path / "run.old-1" / STATE).read_bytes() == saved
    folder.release()


def test_metrics_are_json_lines(tmp_path):
    folder = RunFolder(tmp_path / "run")
    records = [{"step": 1, "loss": 5.5}, {"step": 2, "loss": 5.25, "note": "ok"}]
    for r in records:
        folder.log(r)
    assert [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()] == records


def test_state_round_trips_and_is_summarised(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.lock()
    assert not folder.has_state()
    weights = {"w": torch.randn(3, 4, dtype=torch.float64)}
    folder.save({"step": 2, "settings": {"steps": 5}, "model": weights})
    assert folder.has_state()
    loaded = folder.load()
    assert loaded["step"] == 2 and torch.equal(loaded["model"]["w"], weights["w"])
    assert folder.summary() == "stopped after step 2 of 5"
    folder.save({"step": 5, "settings": {"steps": 5}})
    assert folder.summary() == "finished: 5 of 5 steps"
    folder.save({"step": 1, "settings": {"steps": 30, "one_step": True}})
    assert folder.summary() == "finished: 1 of 1 steps"
    folder.release()


def test_nothing_to_resume_names_resume_and_a_broken_state_restart_with_its_whole_error(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(SlimtuneError, match="nothing to `resume`") as info:
        folder.load()
    assert info.value.params == ("resume",)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / STATE).write_bytes(b"not a torch file" * 20)
    try:  # the error torch itself gives, every line of it
        torch.load(tmp_path / "run" / STATE, weights_only=True)
    except Exception as e:
        whole = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    with pytest.raises(SlimtuneError, match="cannot read") as info:
        folder.load()
    assert info.value.params == ("restart",) and whole in str(info.value) and "\n" not in str(info.value)
    assert "`resume`" not in str(info.value)  # no advice in a circle
    assert folder.summary() == "a saved state that cannot be read"
    assert folder.state_error()  # read through a mapping (the weights stay on disk): torch words it otherwise
