"""Issue 7: bad input on every command, kill -9 at the worst moments, a full disk, and a fuzzed checkpoint parser
(the size parser's fuzzing is in test_units.py).

Bad input must give exit 2, one line on stderr naming the problem (no traceback), write nothing and leave the
inputs as they were. A process killed while writing must leave the previous file or the complete new one; a run
killed anywhere must resume from its last complete state to the weights an uninterrupted run reaches.
"""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import save_model, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.checkpoint import load_checkpoint
from slimtune.cli import main
from slimtune.errors import SlimtuneError

CUDA = torch.cuda.is_available()


@pytest.fixture
def files(tmp_path, data_dir):
    model = tiny_model("sqr", True, dtype=torch.float32, seed=7)
    ckpt = tmp_path / "model.safetensors"
    save_model(ckpt, model)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"abcde")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    (tmp_path / "truncated.safetensors").write_bytes(ckpt.read_bytes()[:-100])
    (tmp_path / "a_file").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    return {"ckpt": ckpt, "data": data_dir / "ptb.test.txt", "dir": tmp_path}


FIT = [
    "fit",
    "--checkpoint",
    "{ckpt}",
    "--data",
    "{data}",
    "--out",
    "{dir}/out.safetensors",
    "--seq-len",
    "32",
    "--device",
    "cpu",
]
PLAN = ["plan", "--checkpoint", "{ckpt}", "--seq-len", "64", "--device", "cpu", "--no-compare"]
PRETRAIN = [
    "pretrain",
    "--recipe",
    "small",
    "--data",
    "{data}",
    "--out",
    "{dir}/out.safetensors",
    "--seq-len",
    "32",
    "--steps",
    "1",
    "--device",
    "cpu",
]
EVAL = [
    "eval",
    "--checkpoint",
    "{ckpt}",
    "--data",
    "{data}",
    "--seq-len",
    "32",
    "--max-bytes",
    "200",
    "--device",
    "cpu",
]
GENERATE = ["generate", "--checkpoint", "{ckpt}", "--bytes", "5", "--device", "cpu"]
CONVERT = ["convert", "{ckpt}", "--out", "{dir}/out.safetensors"]
BENCH = ["bench", "--checkpoint", "{ckpt}", "--seq-len", "64", "--chunks", "16", "--steps", "1", "--device", "cpu"]


def with_(base, **changes):
    """`base` with flags replaced (flag=value, or flag=None to drop it), or extra flags appended."""
    args = list(base)
    for flag, value in changes.items():
        flag = "--" + flag.rstrip("_").replace("_", "-")
        if flag in args:
            i = args.index(flag)
            del args[i : i + 2]
        if value is not None:
            args += [flag, value]
    return args


def positional(base, value):
    return [base[0], value, *base[2:]]


# (command line, a word the one-line message must contain)
BAD_INPUT = {
    # paths
    "fit data missing": (with_(FIT, data="{dir}/nope.txt"), "nope.txt"),
    "fit data empty": (with_(FIT, data="{dir}/empty.txt"), "empty.txt"),
    "fit data too short": (with_(FIT, data="{dir}/short.txt"), "seq"),
    "fit data is a folder": (with_(FIT, data="{dir}/folder"), "folder"),
    "fit checkpoint missing": (with_(FIT, checkpoint="{dir}/nope.safetensors"), "nope.safetensors"),
    "fit checkpoint is a folder": (with_(FIT, checkpoint="{dir}/folder"), "folder"),
    "fit checkpoint empty": (with_(FIT, checkpoint="{dir}/empty.txt"), "empty.txt"),
    "fit checkpoint garbage": (with_(FIT, checkpoint="{dir}/garbage.safetensors"), "garbage.safetensors"),
    "fit checkpoint truncated": (with_(FIT, checkpoint="{dir}/truncated.safetensors"), "truncated"),
    "fit out equals checkpoint": (with_(FIT, out="{ckpt}"), "--out"),
    "fit out under a file": (with_(FIT, out="{dir}/a_file/out.safetensors"), "a_file"),
    # sizes and numbers
    "fit budget zero": (with_(FIT, mem_budget="0"), "0"),
    "fit budget negative": (with_(FIT, mem_budget="-2GB"), "-2GB"),
    "fit budget nan": (with_(FIT, mem_budget="nan"), "nan"),
    "fit budget words": (with_(FIT, mem_budget="lots"), "lots"),
    "fit budget percent over 100": (with_(FIT, mem_budget="150%"), "150%"),
    "fit chunk zero": (with_(FIT, chunk_size="0"), "--chunk-size"),
    "fit chunk negative": (with_(FIT, chunk_size="-3"), "--chunk-size"),
    "fit chunk words": (with_(FIT, chunk_size="big"), "--chunk-size"),
    "fit seq len zero": (with_(FIT, seq_len="0"), "--seq-len"),
    "fit seq len words": (with_(FIT, seq_len="long"), "--seq-len"),
    "fit steps zero": (with_(FIT, steps="0"), "--steps"),
    "fit batch negative": (with_(FIT, batch_size="-1"), "--batch-size"),
    "fit lr nan": (with_(FIT, lr="nan"), "--lr"),
    "fit lr negative": (with_(FIT, lr="-0.1"), "--lr"),
    "fit lr inf": (with_(FIT, lr="inf"), "--lr"),
    "fit clip zero": (with_(FIT, clip_grad="0"), "--clip-grad"),
    "fit unknown optimizer": (with_(FIT, optimizer="lion"), "--optimizer"),
    "fit unknown precision": (with_(FIT, precision="fp8"), "--precision"),
    "fit unknown device": (with_(FIT, device="tpu"), "tpu"),
    "fit resume nothing": (with_(FIT, resume=None) + ["--resume"], "resume"),
    "plan budget words": (with_(PLAN, mem_budget="a lot"), "a lot"),
    "plan seq len zero": (with_(PLAN, seq_len="0"), "--seq-len"),
    "plan checkpoint missing": (with_(PLAN, checkpoint="{dir}/nope.safetensors"), "nope.safetensors"),
    "plan budget too small": (with_(PLAN, mem_budget="1MB"), "budget"),
    "pretrain unknown recipe": (with_(PRETRAIN, recipe="config-9"), "config-9"),
    "pretrain data missing": (with_(PRETRAIN, data="{dir}/nope.txt"), "nope.txt"),
    "pretrain chunk words": (with_(PRETRAIN, chunk_size="some"), "--chunk-size"),
    "pretrain bad layernorm": (with_(PRETRAIN, layernorm="middle"), "--layernorm"),
    "pretrain heads do not divide": (with_(PRETRAIN, hidden_dim="132", n_heads="5"), "n_heads"),
    "pretrain out under a file": (with_(PRETRAIN, out="{dir}/a_file/x.safetensors"), "a_file"),
    "eval data empty": (with_(EVAL, data="{dir}/empty.txt"), "empty.txt"),
    "eval checkpoint garbage": (with_(EVAL, checkpoint="{dir}/garbage.safetensors"), "garbage"),
    "eval seq len zero": (with_(EVAL, seq_len="0"), "--seq-len"),
    "eval unknown adapt": (with_(EVAL, adapt="two-steps"), "--adapt"),
    "generate bytes negative": (with_(GENERATE, bytes="-4"), "--bytes"),
    "generate temperature nan": (with_(GENERATE, temperature="nan"), "--temperature"),
    "generate checkpoint missing": (with_(GENERATE, checkpoint="{dir}/nope.safetensors"), "nope.safetensors"),
    "inspect missing": (["inspect", "{dir}/nope.safetensors"], "nope.safetensors"),
    "inspect folder": (["inspect", "{dir}/folder"], "folder"),
    "inspect garbage": (["inspect", "{dir}/garbage.safetensors"], "garbage"),
    "convert missing": (positional(CONVERT, "{dir}/nope.pt"), "nope.pt"),
    "convert out equals input": (with_(CONVERT, out="{ckpt}"), "--out"),
    "convert bad dtype": (with_(CONVERT, dtype="fp12"), "fp12"),
    "bench checkpoint truncated": (with_(BENCH, checkpoint="{dir}/truncated.safetensors"), "truncated"),
    "bench seq len one": (with_(BENCH, seq_len="1"), "--seq-len"),
}
if not CUDA:
    BAD_INPUT["fit cuda unavailable"] = (with_(FIT, device="cuda"), "CUDA")
    BAD_INPUT["bench cuda unavailable"] = (with_(BENCH, device="cuda"), "CUDA")


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv, needle", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, files, argv, needle):
    argv = [a.format(**files) for a in argv]
    needle = needle.format(**files)
    before = snapshot(files["dir"])
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (argv, captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert needle in lines[0], lines[0]
    assert snapshot(files["dir"]) == before  # nothing written, nothing changed, no folder created


def test_output_in_a_missing_folder_is_created(capsys, files):
    out = files["dir"] / "new" / "deeper" / "tuned.safetensors"
    code = main([a.format(**files) for a in with_(FIT, out=str(out), steps="1", chunk_size="8")])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out).config == load_checkpoint(files["ckpt"]).config


# ---------------------------------------------------------------- fuzzing the checkpoint parser


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    model = tiny_model("sqr", True, dtype=torch.float32, seed=11)
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_model(path, model)
    return path.read_bytes()


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_checkpoint_parser_survives_any_mutation(tmp_path_factory, valid_file, data):
    """Flip, cut or overwrite bytes of a valid checkpoint (header included): loading either succeeds with a
    valid model or raises the one error type the CLI turns into exit 2; nothing else escapes."""
    raw = bytearray(valid_file)
    kind = data.draw(st.sampled_from(["flip", "cut", "overwrite-header", "random"]))
    if kind == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "overwrite-header":
        start = data.draw(st.integers(0, min(len(raw) - 1, 600)))
        patch = data.draw(st.binary(min_size=1, max_size=40))
        raw[start : start + len(patch)] = patch
    else:
        raw = bytearray(data.draw(st.binary(max_size=2000)))
    path = tmp_path_factory.mktemp("m") / "mutated.safetensors"
    path.write_bytes(bytes(raw))
    try:
        ckpt = load_checkpoint(path)
    except SlimtuneError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert all(torch.isfinite(t).all() for t in ckpt.tensors.values())


# ---------------------------------------------------------------- full disk


def _half_then(error):
    """A writer that leaves half a file behind and then fails, as a disk that fills up mid-write does."""

    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)
        raise error

    return write


def test_disk_full_during_export_keeps_the_previous_file(capsys, files, monkeypatch):
    out = files["dir"] / "out.safetensors"
    out.write_bytes(files["ckpt"].read_bytes())  # a previous export
    before = snapshot(files["dir"])
    monkeypatch.setattr("slimtune.checkpoint.save_file", _half_then(OSError(errno.ENOSPC, "No space left on device")))
    args = with_(FIT, steps="1", chunk_size="8", run_dir="{dir}/run")
    code = main([a.format(**files) for a in args] + ["--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left" in err and len(err.strip().splitlines()) == 1, err
    after = snapshot(files["dir"])
    assert after[out] == before[out]  # the previous export, whole
    assert not [p for p in after if ".tmp-" in p.name]  # no partial file left behind


def test_disk_full_during_state_saving_keeps_the_last_state(capsys, files, monkeypatch):
    run = files["dir"] / "run"
    argv = [a.format(**files) for a in with_(FIT, steps="3", chunk_size="8", run_dir=str(run), save_every="1")]
    real_save, calls = torch.save, []

    def save_then_fill_up(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            return real_save(obj, path, *args, **kwargs)
        return _half_then(OSError(errno.ENOSPC, "No space left on device"))(obj, path)

    monkeypatch.setattr(torch, "save", save_then_fill_up)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "No space left" in err and "Traceback" not in err, err
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 1  # the last complete state
    assert not (files["dir"] / "out.safetensors").exists()
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------- kill -9

# Runs the CLI in a child process that SIGKILLs itself at the n-th write of the given kind, after writing half
# of the file: the moment a real crash or power loss would hurt most.
KILLER = r"""
import os, signal, sys
from pathlib import Path
import torch
import slimtune.checkpoint as checkpoint
kind, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = []
def dying(write):
    def wrapped(obj, path, *args, **kwargs):
        calls.append(path)
        write(obj, path, *args, **kwargs)
        if len(calls) == nth:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return wrapped
if kind == "export":
    checkpoint.save_file = dying(checkpoint.save_file)
else:
    torch.save = dying(torch.save)
from slimtune.cli import main
sys.exit(main(argv))
"""


def _child(tmp_path, kind, nth, argv):
    return subprocess.run(
        [sys.executable, "-c", KILLER, kind, str(nth), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


@pytest.fixture
def run_args(files):
    def args(out, run, *extra):
        return [
            a.format(**files)
            for a in with_(
                FIT, out=str(out), steps="5", chunk_size="8", save_every="1", optimizer="adam", run_dir=str(run)
            )
        ] + list(extra)

    return args


def _weights(path):
    return load_checkpoint(path).tensors


def test_kill_9_while_saving_state_resumes_to_the_same_weights(tmp_path, files, run_args):
    whole, run = tmp_path / "whole.safetensors", tmp_path / "run"
    assert main(run_args(whole, tmp_path / "whole.run")) == 0
    out = tmp_path / "out.safetensors"
    killed = _child(tmp_path, "state", 3, run_args(out, run))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2  # step 3's state died half-written
    assert not out.exists()
    assert main(run_args(out, run, "--resume")) == 0
    for name, t in _weights(whole).items():
        assert torch.equal(_weights(out)[name], t), name
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # the dead process's temporary file is cleared


def test_kill_9_while_exporting_keeps_the_previous_checkpoint(tmp_path, files, run_args):
    out, run = tmp_path / "out.safetensors", tmp_path / "run"
    out.write_bytes(files["ckpt"].read_bytes())  # a previous export at the destination
    previous = out.read_bytes()
    killed = _child(tmp_path, "export", 1, [*run_args(out, run), "--overwrite"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.read_bytes() == previous
    # The run had finished its steps: --resume only exports, and the result equals an uninterrupted run's.
    assert main(run_args(out, run, "--resume")) == 0
    whole = tmp_path / "whole.safetensors"
    assert main(run_args(whole, tmp_path / "whole.run")) == 0
    for name, t in _weights(whole).items():
        assert torch.equal(_weights(out)[name], t), name
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_kill_9_at_random_moments_never_breaks_a_file(tmp_path, files, run_args):
    """SIGKILL at seeded random times during a run that saves its state every step, then --resume."""
    out, run = tmp_path / "out.safetensors", tmp_path / "run"
    rng = random.Random(0)
    args = run_args(out, run)
    args[args.index("--steps") + 1] = "30"
    for _attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "slimtune", *args, *(["--resume"] if (run / "state.pt").exists() else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().count("\n") if metrics.exists() else 0
        deadline = time.time() + 120
        while (
            (metrics.read_text().count("\n") if metrics.exists() else 0) <= lines
            and proc.poll() is None  # a run that already finished (or only exports) logs no new step
            and time.time() < deadline
        ):
            time.sleep(0.05)  # this attempt is training
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        state = torch.load(run / "state.pt", weights_only=True)  # always a complete file
        assert 1 <= state["step"] <= 30
        assert not out.exists() or _weights(out)
    assert main(args + ["--resume"]) == 0
    whole = tmp_path / "whole.safetensors"
    whole_args = run_args(whole, tmp_path / "whole.run")
    whole_args[whole_args.index("--steps") + 1] = "30"
    assert main(whole_args) == 0
    for name, t in _weights(whole).items():
        assert torch.equal(_weights(out)[name], t), name
