"""What a new user hit (issue 16), each through the command line as a user runs it: a saved run is never
discarded by accident, pretrain saves and resumes like fit, the budget holds while evaluating, a non-byte
vocabulary or a text file as checkpoint give one line, and logs get progress lines."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.checkpoint import load_checkpoint
from slimtune.cli import main


@pytest.fixture
def ckpt(tmp_path):
    model = tiny_model("sqr", True, dtype=torch.float32, seed=3)
    path = tmp_path / "model.safetensors"
    save_model(path, model)
    return path


def _fit(ckpt, data_dir, out, *extra):
    return [
        "fit",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data_dir / "ptb.test.txt"),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--chunk-size",
        "8",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def test_a_saved_run_is_never_restarted_by_accident(capsys, tmp_path, ckpt, data_dir):
    out = tmp_path / "tuned.safetensors"
    assert main(_fit(ckpt, data_dir, out, "--steps", 3)) == 0
    metrics = (tmp_path / "tuned.safetensors.run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_fit(ckpt, data_dir, out, "--steps", 3)) == 2  # the same command again, without --resume
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finished: 3 of 3 steps" in err and "--resume" in err and "--restart" in err
    assert (tmp_path / "tuned.safetensors.run" / "metrics.jsonl").read_text() == metrics  # untouched
    assert main(_fit(ckpt, data_dir, out, "--steps", 3, "--restart")) == 0
    assert (tmp_path / "tuned.safetensors.run.old-1" / "metrics.jsonl").read_text() == metrics  # moved aside, kept
    steps = [json.loads(line)["step"] for line in (tmp_path / "tuned.safetensors.run" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]


def test_an_existing_out_is_replaced_only_when_asked_or_when_it_is_the_runs_own(capsys, tmp_path, ckpt, data_dir):
    """A run that only shares `--out` with a finished fine-tune (another --run-dir) is refused, nothing written;
    --overwrite replaces it; resuming or restarting the run that wrote it may replace it."""
    out = tmp_path / "tuned.safetensors"
    assert main(_fit(ckpt, data_dir, out, "--steps", 2)) == 0
    finished = out.read_bytes()
    capsys.readouterr()
    other = tmp_path / "other.run"
    assert main(_fit(ckpt, data_dir, out, "--steps", 1, "--run-dir", other)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err, err
    assert out.read_bytes() == finished and not other.exists()  # nothing written, nothing lost
    assert main(_fit(ckpt, data_dir, out, "--steps", 3, "--resume")) == 0  # the run that wrote it, continued
    resumed = out.read_bytes()
    assert resumed != finished
    assert main(_fit(ckpt, data_dir, out, "--steps", 1, "--run-dir", other, "--overwrite", "--seed", 7)) == 0
    assert out.read_bytes() != resumed


def test_a_corrupt_run_state_shows_its_whole_error_and_points_to_restart(capsys, tmp_path, ckpt, data_dir):
    out = tmp_path / "tuned.safetensors"
    assert main(_fit(ckpt, data_dir, out, "--steps", 2)) == 0
    state = tmp_path / "tuned.safetensors.run" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short, as a full disk would
    capsys.readouterr()
    for extra in ([], ["--resume"]):
        assert main(_fit(ckpt, data_dir, out, "--steps", 2, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--restart" in err and "--resume" not in err, err
    try:
        torch.load(state, weights_only=True)
    except Exception as e:
        assert str(e).splitlines()[-1].strip() in err  # the whole error, its last line included
    broken = state.read_bytes()
    assert main(_fit(ckpt, data_dir, out, "--steps", 2, "--restart")) == 0
    assert (tmp_path / "tuned.safetensors.run.old-1" / "state.pt").read_bytes() == broken  # kept aside


def _slimtune(cwd, *args, env=None, timeout=600):
    """`python -m slimtune ARGS` in a fresh process, run in `cwd`; its CompletedProcess (text output captured)."""
    cmd = [sys.executable, "-m", "slimtune", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _wait_for_metrics(path, proc, lines=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {lines} metrics lines in {path}")


def test_pretrain_saves_on_ctrl_c_and_resumes_to_the_same_weights(tmp_path, data_dir):
    args = [
        "pretrain",
        "--recipe",
        "small",
        "--data",
        str(data_dir / "ptb.test.txt"),
        "--hidden-dim",
        "32",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "400",
        "--save-every",
        "1",
        "--device",
        "cpu",
    ]
    out = tmp_path / "p.safetensors"
    env = os.environ | {"SLIMTUNE_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimtune", *args, "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    _wait_for_metrics(tmp_path / "p.safetensors.run" / "metrics.jsonl", proc, lines=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err, err
    assert (tmp_path / "p.safetensors.run" / "state.pt").is_file() and not out.exists()
    resumed = _slimtune(tmp_path, *args, "--out", out, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the run in" in resumed.stderr and "stopped after step" in resumed.stderr
    whole = tmp_path / "whole.safetensors"
    straight = _slimtune(tmp_path, *args, "--out", whole, env=env)
    assert straight.returncode == 0, straight.stderr
    a, b = load_checkpoint(out).tensors, load_checkpoint(whole).tensors
    for name, t in b.items():
        assert torch.equal(a[name], t), name


def test_held_out_evaluation_stays_inside_a_tight_budget(tmp_path, data_dir):
    """The held-out bpc runs at the plan's C and batch: the measured peak (RSS of a fresh process) stays inside a
    budget that full backprop does not fit, with an evaluation after every step."""
    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    base = tmp_path / "base.safetensors"
    save_model(base, model)

    def run(*a):
        return _slimtune(tmp_path, *a, "--json")

    planned = run("plan", "--checkpoint", base, "--seq-len", 8192, "--device", "cpu", "--no-compare")
    candidates = json.loads(planned.stdout.splitlines()[-1])["candidates"]
    by_size = {c["chunk_size"]: c["predicted_peak_bytes"] for c in candidates}
    budget = (by_size[2048] + by_size[4096]) // 2
    fitted = run(
        "fit",
        "--checkpoint",
        base,
        "--data",
        data_dir / "ptb.test.txt",
        "--out",
        tmp_path / "t.safetensors",
        "--seq-len",
        8192,
        "--steps",
        2,
        "--mem-budget",
        budget,
        "--eval-data",
        data_dir / "ptb.valid.txt",
        "--eval-every",
        1,
        "--device",
        "cpu",
    )
    assert fitted.returncode == 0, fitted.stderr
    result = json.loads(fitted.stdout.splitlines()[-1])
    assert result["chunk_size"] < 8192 and result["metrics"]["bpc_bytes"] > 0
    assert result["peak_memory_bytes"] <= budget, (result["peak_memory_bytes"], budget)


def test_a_smaller_vocabulary_than_bytes_is_one_line_for_every_command(capsys, tmp_path, data_dir):
    model = tiny_model("sqr", True, dtype=torch.float32, vocab_size=128)
    path = tmp_path / "v128.safetensors"
    save_model(path, model)
    utf8 = tmp_path / "utf8.txt"
    utf8.write_text("Grüße aus Köln, naïve café " * 50)
    for args in (
        ["fit", "--checkpoint", path, "--data", utf8, "--out", tmp_path / "o.safetensors", "--seq-len", 16],
        ["eval", "--checkpoint", path, "--data", utf8, "--seq-len", 16],
        ["eval", "--checkpoint", path, "--data", utf8, "--seq-len", 16, "--adapt", "one-step", "--chunk-size", 4],
        ["generate", "--checkpoint", path, "--prompt", "café"],
    ):
        code = main([str(a) for a in args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "vocab" in err and "256" in err, (args, err)
        assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.safetensors.run").exists()


def test_a_text_file_as_checkpoint_is_not_a_checkpoint(capsys, tmp_path, data_dir):
    code = main(["inspect", str(data_dir / "ptb.valid.txt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not a checkpoint" in err and "--data" in err and len(err.splitlines()) == 1


def test_logs_get_plain_progress_lines(tmp_path, ckpt, data_dir):
    out = tmp_path / "t.safetensors"
    env = os.environ | {"SLIMTUNE_PROGRESS_SECONDS": "0"}  # every step, so that a short run shows it
    proc = _slimtune(tmp_path, *_fit(ckpt, data_dir, out, "--steps", 3), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fit: ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("loss" in line and "tok/s" in line and "ETA" in line for line in lines)


HF_LOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
print(type(model).__name__)
"""


HF_GENERATE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
prompt = torch.tensor([list(sys.argv[2].encode())])
out = model.generate(prompt, max_new_tokens=int(sys.argv[3]), do_sample=False, pad_token_id=0)  # its default cache
plain = model.generate(prompt, max_new_tokens=int(sys.argv[3]), do_sample=False, use_cache=False, pad_token_id=0)
assert torch.equal(out, plain), (out, plain)
sys.stdout.buffer.write(bytes(out[0, prompt.shape[1]:].tolist()))
"""


def test_an_hf_export_generates_in_transformers_what_slimtune_generates(tmp_path):
    """model.generate(...) on the --format hf folder (greedy) continues a prompt byte for byte as slimtune's own
    recurrent `generate` at temperature 0 does (transformers 5 had no generate for it: no GenerationMixin)."""
    pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
    from slimtune import PerformerLM, generate

    src = tmp_path / "m.safetensors"
    save_model(src, tiny_model("sqr", True, dtype=torch.float32, seed=5, hidden_dim=32, n_layers=2, ffn_dim=64))
    folder = PerformerLM.from_pretrained(src).save_pretrained(tmp_path / "hf", format="hf")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", HF_GENERATE, str(folder), "To be, or not", "40"],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    ours = generate(PerformerLM.from_pretrained(folder), "To be, or not", 40, temperature=0)
    assert len(ours) == 40 and run.stdout == ours


@pytest.mark.parametrize("feature_type, on_gptln", [("sqr", True), ("elu+1", False)])
def test_an_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, feature_type, on_gptln):
    pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
    from slimtune import PerformerLM

    model = tiny_model(feature_type, on_gptln, dtype=torch.float32, seed=4)
    src = tmp_path / "m.safetensors"
    save_model(src, model)
    folder = PerformerLM.from_pretrained(src).save_pretrained(tmp_path / "hf", format="hf")
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}  # no network, no shared cache
    run = subprocess.run(
        [sys.executable, "-c", HF_LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "SLiMPerformerForCausalLM"
    with torch.no_grad():
        ours = PerformerLM.from_pretrained(folder)(ids)
    theirs = torch.load(tmp_path / "logits.pt")
    assert (theirs - ours).abs().max().item() <= 1e-4 * ours.abs().max().item()
