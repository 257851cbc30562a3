"""Atomic writes of files and folders (slimtune/atomic.py): kill -9 at every stage of an hf-folder export leaves
the previous folder or the new one, whole; stale temporaries are swept; permissions follow the umask."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.atomic import atomic_write, sweep
from slimtune.checkpoint import load_checkpoint, save_checkpoint

# A child process exports an hf folder over an existing one and SIGKILLs itself at the named stage.
KILLER = r"""
import os, signal, sys
import torch
import slimtune.atomic as atomic
from slimtune.checkpoint import load_checkpoint, save_checkpoint
stage, src, folder = sys.argv[1:]
def die(name):
    if name == stage:
        os.kill(os.getpid(), signal.SIGKILL)
atomic._stage = die
if stage == "no-exchange":  # the fallback of systems without renameat2: two renames, killed between them
    atomic._exchange = lambda a, b: False
    real = os.replace
    def replace(a, b):
        real(a, b)
        if ".old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.replace = replace
ckpt = load_checkpoint(src)
tensors = {k: v + 1 for k, v in ckpt.tensors.items()}  # the new weights: old + 1
save_checkpoint(folder, tensors, ckpt.config, fmt="hf")
"""


def _model_file(tmp_path):
    model = tiny_model("sqr", True, dtype=torch.float32)
    path = tmp_path / "src.safetensors"
    save_model(path, model)
    return path


@pytest.mark.parametrize("stage", ["written", "swapped", "no-exchange", "never"])
def test_kill_9_at_every_stage_of_an_hf_export_leaves_a_whole_folder(tmp_path, stage):
    src = _model_file(tmp_path)
    old = load_checkpoint(src)
    folder = tmp_path / "out-hf"
    save_checkpoint(folder, old.tensors, old.config, fmt="hf")  # the previous export
    child = subprocess.run(
        [sys.executable, "-c", KILLER, stage, str(src), str(folder)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == (0 if stage == "never" else -9), child.stderr
    sweep(folder)  # what the next write does first: clear dead writers' leftovers, restore an old folder
    found = load_checkpoint(folder)  # whole: it loads and validates
    expect_new = stage in ("swapped", "never")
    for name, t in old.tensors.items():
        assert torch.equal(found.tensors[name], t + 1 if expect_new else t), (stage, name)
    assert json.loads((folder / "config.json").read_text())["hidden_dim"] == old.config.hidden_dim
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-hf", "src.safetensors"]  # nothing stale left


def test_a_failed_write_changes_nothing(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        with atomic_write(tmp_path / "folder", folder=True) as tmp:
            (tmp / "inner.txt").write_text("y")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "inner.txt").stat().st_mode & 0o777 == 0o644


def test_exports_and_run_states_follow_the_umask(tmp_path):
    """An exported checkpoint, an hf folder and a run state get 0644 / 0755 under umask 022, like other files."""
    from slimtune.runs import RunFolder

    model = tiny_model("sqr", True, dtype=torch.float32)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.safetensors", tensors, model.config)
        save_checkpoint(tmp_path / "hf", tensors, model.config, fmt="hf")
        RunFolder(tmp_path / "run").save({"step": 1})
    finally:
        os.umask(previous)
    for path in (tmp_path / "m.safetensors", tmp_path / "hf" / "model.safetensors", tmp_path / "run" / "state.pt"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
