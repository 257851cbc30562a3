"""The command line, end to end: contract flags and JSON, exactness of --one-step, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import reference
import torch
from helpers import assert_close, save_model, tiny_model

from slimtune.checkpoint import load_checkpoint
from slimtune.cli import main

L = 96


@pytest.fixture
def ckpt(tmp_path):
    model = tiny_model("sqr", True, dtype=torch.float32, seed=5)
    path = tmp_path / "model.safetensors"
    save_model(path, model)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_one_step_sgd_matches_an_independent_update(capsys, tmp_path, ckpt, data_dir):
    """--one-step: rows b = bytes [bL, bL + L + 1) of the file, plain SGD, exported in the input's names/dtypes."""
    data, out, lr, B = data_dir / "ptb.valid.txt", tmp_path / "tuned.safetensors", 0.5, 2
    code, stdout, _ = run(
        capsys,
        "fit",
        "--checkpoint",
        ckpt,
        "--data",
        data,
        "--out",
        out,
        "--one-step",
        "--optimizer",
        "sgd",
        "--lr",
        lr,
        "--seq-len",
        L,
        "--batch-size",
        B,
        "--chunk-size",
        7,
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0
    result = last_json(stdout)
    assert {"chunk_size", "seq_len", "steps", "loss", "peak_memory_bytes", "device", "out"} <= result.keys()
    assert (result["chunk_size"], result["seq_len"], result["steps"], result["device"]) == (7, L, 1, "cpu")

    raw = torch.tensor(list(data.read_bytes()[: B * L + 1]))
    windows = torch.stack([raw[b * L : b * L + L + 1] for b in range(B)])
    base = load_checkpoint(ckpt)
    ref_loss, grads = reference.loss_and_grads(base.tensors, base.config.to_dict(), windows)
    assert abs(result["loss"] - ref_loss) < 1e-5 * ref_loss
    tuned = load_checkpoint(out)
    assert tuned.config == base.config
    for name, before in base.tensors.items():
        assert tuned.tensors[name].dtype == before.dtype
        assert_close(tuned.tensors[name] - before, -lr * grads[name], 1e-4, name)


def test_slim_and_full_backprop_export_the_same_weights(capsys, tmp_path, ckpt, data_dir):
    weights = {}
    for c in (13, L):
        out = tmp_path / f"c{c}.safetensors"
        code, _, _ = run(
            capsys,
            "fit",
            "--checkpoint",
            ckpt,
            "--data",
            data_dir / "ptb.test.txt",
            "--out",
            out,
            "--steps",
            3,
            "--seq-len",
            L,
            "--chunk-size",
            c,
            "--optimizer",
            "adam",
            "--lr",
            1e-3,
        )
        assert code == 0
        weights[c] = load_checkpoint(out).tensors
    for name in weights[L]:
        assert_close(weights[13][name], weights[L][name], 1e-5, name)


def test_auto_chunk_size_reports_plan(capsys, tmp_path, ckpt, data_dir):
    code, stdout, _ = run(
        capsys,
        "fit",
        "--checkpoint",
        ckpt,
        "--data",
        data_dir / "ptb.test.txt",
        "--out",
        tmp_path / "o.safetensors",
        "--seq-len",
        300,
        "--mem-budget",
        "4GB",
        "--json",
    )
    assert code == 0
    result = last_json(stdout)
    assert result["chunk_size"] == 300  # a tiny model: full backprop fits in 4 GB
    assert result["plan"]["budget_bytes"] <= 4 * 10**9


def test_plan_json(capsys, ckpt):
    code, stdout, _ = run(
        capsys, "plan", "--checkpoint", ckpt, "--seq-len", 2048, "--mem-budget", "50%", "--json", "--no-compare"
    )
    assert code == 0
    plan = last_json(stdout)
    assert {"chunk_size", "budget_bytes", "candidates"} <= plan.keys()
    sizes = [c["chunk_size"] for c in plan["candidates"]]
    assert sizes == sorted(sizes) and 2048 in sizes
    peaks = [c["predicted_peak_bytes"] for c in plan["candidates"]]
    assert peaks == sorted(peaks), "predicted peak must grow with C"


def test_eval_bpc_matches_reference(capsys, tmp_path, ckpt):
    text = tmp_path / "t.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 5)
    code, stdout, _ = run(capsys, "eval", "--checkpoint", ckpt, "--data", text, "--seq-len", 64, "--json")
    assert code == 0
    bpc = last_json(stdout)["bpc"]
    raw = torch.tensor(list(text.read_bytes()))
    base = load_checkpoint(ckpt)
    total, count = 0.0, 0
    for s in range(0, raw.numel() - 1, 64):
        w = raw[s : s + 65][None]
        loss, _ = reference.loss_and_grads(base.tensors, base.config.to_dict(), w)
        total, count = total + loss * (w.shape[1] - 1), count + w.shape[1] - 1
    assert abs(bpc - total / count / torch.log(torch.tensor(2.0)).item()) < 1e-5


def test_version_and_help(capsys):
    code, stdout, _ = run(capsys, "--version")
    assert code == 0 and stdout.startswith("slimtune ")
    code, stdout, _ = run(capsys, "--help")
    assert code == 0
    for command in ("fit", "plan", "eval", "inspect", "convert", "env", "demo"):
        assert command in stdout


def test_console_script_and_module_entry(tmp_path, ckpt):
    script = Path(sys.executable).parent / "slimtune"  # the console script installed beside this interpreter
    for cmd in ([str(script)], [sys.executable, "-m", "slimtune"]):
        proc = subprocess.run([*cmd, "inspect", str(ckpt), "--json"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert last_json(proc.stdout)["parameters"] == sum(t.numel() for t in load_checkpoint(ckpt).tensors.values())


BAD = {  # flags -> what the one line must name
    "lr-word": (["--lr", "fast"], "--lr"),
    "lr-negative": (["--lr", "-1"], "--lr"),
    "chunk-word": (["--chunk-size", "big"], "big"),
    "optimizer": (["--optimizer", "lion"], "lion"),
    "budget-tiny": (["--mem-budget", "1MB"], "cannot fit even C = 1"),
    "device": (["--device", "tpu"], "tpu"),
    "recovery": (["--state-recovery", "guess"], "guess"),
}


@pytest.mark.parametrize("command", ["fit", "plan"])
@pytest.mark.parametrize("extra, named", BAD.values(), ids=BAD.keys())
def test_bad_flags_name_the_value_in_one_line(capsys, tmp_path, ckpt, data_dir, command, extra, named):
    """fit and plan read the same flags the same way: `plan --state-recovery guess` is refused like fit's."""
    if command == "plan" and extra[0] in ("--lr", "--chunk-size"):
        pytest.skip("fit-only flag")
    out = tmp_path / "never.safetensors"
    args = [command, "--checkpoint", ckpt, "--seq-len", 64, *extra]
    if command == "fit":
        args += ["--data", data_dir / "ptb.test.txt", "--out", out]
    code, stdout, stderr = run(capsys, *args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], stderr
    assert not out.exists() and not Path(f"{out}.run").exists()


def test_fit_reports_every_missing_option_at_once(capsys):
    code, _, stderr = run(capsys, "fit", "--mem-budget", "2GB")
    assert (
        code == 2
        and stderr.strip() == "slimtune: error: slimtune fit needs --checkpoint and --data (see 'slimtune fit --help')"
    )


def _invoke(monkeypatch, module: str, name: str, argv: list[str]):
    """Run the CLI with the library call `module.name` replaced by a recorder; returns its arguments."""
    from typer.testing import CliRunner

    from slimtune.cli import app

    seen = {}

    def record(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise SystemExit(0)  # stop before rendering: only the call is checked

    monkeypatch.setattr(f"slimtune.{module}.{name}", record)
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0 and seen, result.output
    return seen


def test_fit_flags_become_the_options_the_library_gets(monkeypatch, tmp_path, ckpt, data_dir):
    seen = _invoke(
        monkeypatch,
        "train",
        "fit",
        [
            "fit",
            "--checkpoint",
            ckpt,
            "--data",
            data_dir / "ptb.test.txt",
            "--seq-len",
            300,
            "--batch-size",
            3,
            "--steps",
            7,
            "--optimizer",
            "adamw",
            "--lr",
            "0.02",
            "--weight-decay",
            "0.1",
            "--chunk-size",
            "full",
            "--mem-budget",
            "2GB",
            "--schedule",
            "cosine",
            "--warmup",
            2,
            "--clip-grad",
            "1.5",
            "--accumulate",
            2,
            "--state-recovery",
            "store",
            "--precision",
            "bf16",
            "--dtype",
            "fp16",
            "--format",
            "hf",
            "--seed",
            9,
            "--eval-fraction",
            "0.1",
            "--skip-nonfinite",
            "--device",
            "cpu",
        ],
    )
    checkpoint, data, out, options = seen["args"]
    assert checkpoint == ckpt and data == data_dir / "ptb.test.txt"  # fit reads it once it holds the run folder
    assert out == ckpt.with_name("model-tuned")  # the default beside the input (a folder for --format hf)
    expected = dict(
        seq_len=300,
        batch_size=3,
        steps=7,
        optimizer="adamw",
        lr=0.02,
        weight_decay=0.1,
        chunk_size="full",  # the library reads it (L = 300)
        mem_budget="2GB",
        schedule="cosine",
        warmup=2,
        clip_grad=1.5,
        accumulate=2,
        recovery="store",
        precision="bf16",
        dtype="fp16",
        format="hf",
        seed=9,
        skip_nonfinite=True,
        device="cpu",
        run_dir=f"{out}.run",
        resume=False,
        one_step=False,
    )
    assert {k: getattr(options, k) for k in expected} == expected
    assert seen["kwargs"]["eval_fraction"] == 0.1


def test_pretrain_flags_override_the_recipe(monkeypatch, tmp_path):
    seen = _invoke(
        monkeypatch,
        "train",
        "pretrain",
        [
            "pretrain",
            "--recipe",
            "small",
            "--out",
            tmp_path / "m.safetensors",
            "--hidden-dim",
            64,
            "--layernorm",
            "pre",
            "--steps",
            3,
            "--chunk-size",
            "auto",
            "--mem-budget",
            "1GB",
        ],
    )
    config, data, out, options = seen["args"]
    assert (config.hidden_dim, config.ffn_dim, config.n_layers, config.on_gptln) == (64, 256, 2, False)
    assert (options.steps, options.seq_len, options.chunk_size, options.mem_budget) == (3, 256, None, "1GB")


def test_plan_flags_reach_the_planner(monkeypatch, ckpt):
    seen = _invoke(
        monkeypatch,
        "strategies",
        "plan_fit",
        ["plan", "--checkpoint", ckpt, "--seq-len", 2048, "--batch-size", 2, "--mem-budget", "80%", "--optimizer",
         "sgd", "--state-recovery", "subtract", "--precision", "bf16", "--data", ckpt, "--data", ckpt, "--device",
         "cpu", "--no-compare"],
    )  # fmt: skip
    options = seen["args"][1]
    assert seen["args"][0] == Path(ckpt) and seen["kwargs"]["data"] == [Path(ckpt), Path(ckpt)]
    assert seen["kwargs"]["compare_strategies"] is False
    got = {k: str(getattr(options, k)) for k in ("seq_len", "batch_size", "mem_budget", "optimizer", "recovery")}
    assert got == dict(seq_len="2048", batch_size="2", mem_budget="80%", optimizer="sgd", recovery="subtract")
    assert (str(options.precision), str(options.heap), options.device) == ("bf16", "managed", "cpu")


def test_plan_fit_predicts_fits_own_workload(monkeypatch, ckpt, tmp_path):
    """The library's plan of a fit: what fit holds of each data file counts (a text file, mapped: one step's window
    and a page at each end; records, in memory: their bytes and their mask, already held), the heap is fit's
    (managed), and a bf16 base plans under bf16 autocast as its fit computes."""
    import mmap

    from slimtune import strategies

    seen = {}

    def record(model, work, budget, **kw):
        seen.update(work=work, budget=budget, **kw)
        raise SystemExit(0)

    text, records = tmp_path / "a.txt", tmp_path / "r.jsonl"
    text.write_bytes(b"x" * 5000)
    records.write_text('{"prompt": "Q: 2+2?", "completion": " 4"}\n{"text": "plain text"}\n')
    n_tokens = len("Q: 2+2? 4plain text")
    monkeypatch.setattr(strategies, "plan_chunk_size", record)
    with pytest.raises(SystemExit):
        strategies.plan_fit(ckpt, data=[text, records], compare_strategies=False, seq_len=2048, mem_budget="80%",
                            device="cpu", lora_rank=2, base_dtype="bf16")  # fmt: skip
    work = seen["work"]
    assert work.data_bytes == (2049 + 2 * mmap.PAGESIZE) + 2 * n_tokens and seen["resident_data"] == 2 * n_tokens
    assert str(seen["heap"]) == "managed"
    assert (work.seq_len, str(work.precision), seen["budget"]) == (2048, "bf16", "80%")


def test_bad_files_exit_2(capsys, tmp_path, ckpt, data_dir):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    cases = {
        "missing data": ["--data", tmp_path / "nope.txt"],
        "empty data": ["--data", empty],
        "data is a folder": ["--data", tmp_path],
        "missing checkpoint": ["--checkpoint", tmp_path / "nope.safetensors"],
        "out equals checkpoint": ["--out", ckpt],
    }
    for what, override in cases.items():
        args = {"--checkpoint": ckpt, "--data": data_dir / "ptb.test.txt", "--out": tmp_path / "o.safetensors"}
        args[override[0]] = override[1]
        before = ckpt.read_bytes()
        code, _, stderr = run(capsys, "fit", *[x for kv in args.items() for x in kv], "--seq-len", 32)
        assert code == 2, what
        assert len(stderr.strip().splitlines()) == 1, (what, stderr)
        assert not (tmp_path / "o.safetensors").exists(), what
        assert ckpt.read_bytes() == before, what


def test_unavailable_cuda_is_bad_input(capsys, tmp_path, ckpt, data_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, stderr = run(
        capsys,
        "fit",
        "--checkpoint",
        ckpt,
        "--data",
        data_dir / "ptb.test.txt",
        "--out",
        tmp_path / "o.safetensors",
        "--device",
        "cuda",
        "--seq-len",
        32,
    )
    assert code == 2 and "CUDA" in stderr and len(stderr.strip().splitlines()) == 1


def test_held_out_fraction_reports_bpc(capsys, tmp_path, ckpt, data_dir):
    out = tmp_path / "o.safetensors"
    code, stdout, stderr = run(
        capsys,
        "fit",
        "--checkpoint",
        ckpt,
        "--data",
        data_dir / "ptb.test.txt",
        "--out",
        out,
        "--steps",
        2,
        "--seq-len",
        32,
        "--chunk-size",
        8,
        "--eval-fraction",
        0.1,
        "--json",
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert 0 < result["metrics"]["bpc"] < 9
    lines = (tmp_path / "o.safetensors.run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "bpc" in json.loads(lines[-1])
    for bad in ("0", "1.5"):
        code, _, stderr = run(
            capsys,
            "fit",
            "--checkpoint",
            ckpt,
            "--data",
            data_dir / "ptb.test.txt",
            "--out",
            tmp_path / "x.safetensors",
            "--eval-fraction",
            bad,
        )
        assert code == 2 and "--eval-fraction" in stderr and not (tmp_path / "x.safetensors").exists()


# -- the run flow as a user meets it -----------------------------------------------------------------------------------


def test_ctrl_c_before_the_first_save_says_nothing_was_saved(capsys, tmp_path, ckpt, data_dir, monkeypatch):
    """Interrupted while planning, there is no run state: the message says so instead of pointing to --resume."""
    from slimtune import planner

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(planner, "resolve_budget", interrupted)
    out = tmp_path / "x.safetensors"
    args = ["fit", "--checkpoint", ckpt, "--data", data_dir / "ptb.test.txt", "--out", out, "--seq-len", 64]
    code, _, stderr = run(capsys, *args, "--mem-budget", "2GB", "--device", "cpu")
    assert code == 130 and "nothing was saved" in stderr and "--resume" not in stderr, stderr
    assert not out.exists() and not Path(f"{out}.run").exists()


@pytest.mark.parametrize("kind", ["safetensors", "zip", "pickle"])
def test_a_checkpoint_given_as_data_is_refused(capsys, tmp_path, ckpt, kind):
    """`--data model.safetensors` (or a torch.save file) would train on the weights' bytes: refused, exit 2."""
    if kind == "safetensors":
        data = ckpt
    else:
        data = tmp_path / f"weights-{kind}.pt"
        torch.save({"w": torch.zeros(64)}, data, _use_new_zipfile_serialization=kind == "zip")
    out = tmp_path / "x.safetensors"
    code, _, stderr = run(capsys, "fit", "--checkpoint", ckpt, "--data", data, "--out", out, "--device", "cpu")
    line = stderr.strip()
    assert code == 2 and len(line.splitlines()) == 1 and f"model file ({kind})" in line and "--data" in line
    assert not out.exists() and not Path(f"{out}.run").exists()


def test_eval_scores_every_checkpoint_at_one_default_length_and_says_which(capsys, tmp_path, data_dir):
    """A base saved at L 64 and a fine-tune saved at L 512 are scored at the same L by default, printed beside
    the bpc."""
    seen = []
    for name, seq_len in (("base", 64), ("tuned", 512)):
        path = tmp_path / f"{name}.safetensors"
        tiny_model("sqr", True, dtype=torch.float32).save_pretrained(path, extra_config={"seq_len": seq_len})
        code, stdout, stderr = run(
            capsys,
            "eval",
            "--checkpoint",
            path,
            "--data",
            data_dir / "ptb.test.txt",
            "--json",
            "--max-bytes",
            3000,
            "--device",
            "cpu",
        )
        assert code == 0
        seen.append((last_json(stdout)["seq_len"], "at seq len 1024" in stderr))
    assert seen == [(1024, True), (1024, True)]


def test_pretrain_says_one_step_and_the_time_of_the_whole_run(capsys, tmp_path, data_dir):
    out = tmp_path / "p.safetensors"
    args = ["pretrain", "--data", data_dir / "ptb.test.txt", "--out", out, "--steps", 1, "--seq-len", 32]
    code, stdout, _ = run(capsys, *args, "--hidden-dim", 16, "--n-heads", 2, "--batch-size", 2, "--device", "cpu")
    assert code == 0 and stdout.startswith("1 step, ") and "1 steps" not in stdout


def test_resume_with_other_settings_names_the_flags(capsys, tmp_path, ckpt, data_dir):
    """The library names the parameter (recovery); the command line shows the flag the user typed."""
    out = tmp_path / "x.safetensors"
    args = [
        "fit",
        "--checkpoint",
        ckpt,
        "--data",
        data_dir / "ptb.test.txt",
        "--out",
        out,
        "--seq-len",
        32,
        "--chunk-size",
        8,
        "--device",
        "cpu",
    ]
    assert run(capsys, *args)[0] == 0
    code, _, stderr = run(capsys, *args, "--resume", "--state-recovery", "store")
    assert code == 2 and "started with --state-recovery 'subtract64' (now 'store')" in stderr, stderr
    code, _, stderr = run(capsys, *args)
    assert code == 2 and "add --resume to continue it, or --restart" in stderr, stderr


def test_ctrl_c_outside_a_run_says_interrupted(capsys, ckpt, monkeypatch):
    """A plan (no training loop) interrupted: one line and exit 130, not typer's silent exit."""
    from slimtune import planner

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(planner, "resolve_budget", interrupted)
    code, _, stderr = run(capsys, "plan", "--checkpoint", ckpt, "--seq-len", 64, "--device", "cpu", "--no-compare")
    assert code == 130 and stderr.strip() == "slimtune: interrupted"


def test_resume_without_out_continues_the_default_output(capsys, tmp_path, ckpt, data_dir):
    """`fit` without --out wrote model-tuned.safetensors; the same command with --resume --steps 4 continues that
    run (it does not start model-tuned-2)."""
    args = ["fit", "--checkpoint", ckpt, "--data", data_dir / "ptb.test.txt", "--seq-len", 32, "--chunk-size", 8]
    args += ["--device", "cpu", "--threads", 1, "--json"]
    assert run(capsys, *args, "--steps", 2)[0] == 0
    code, stdout, stderr = run(capsys, *args, "--steps", 4, "--resume")
    result = last_json(stdout)
    assert code == 0 and result["first_step"] == 2 and result["steps"] == 4, stderr
    assert result["out"] == str(ckpt.with_name("model-tuned.safetensors"))
    assert not ckpt.with_name("model-tuned-2.safetensors").exists()


def test_a_restart_refused_for_its_budget_keeps_the_old_run_in_place(capsys, tmp_path, ckpt, data_dir):
    out = tmp_path / "x.safetensors"
    args = ["fit", "--checkpoint", ckpt, "--data", data_dir / "ptb.test.txt", "--out", out, "--seq-len", 32]
    assert run(capsys, *args, "--chunk-size", 8, "--device", "cpu")[0] == 0
    code, _, stderr = run(capsys, *args, "--restart", "--mem-budget", "1KB", "--device", "cpu")
    assert code == 2 and "cannot fit" in stderr
    assert (Path(f"{out}.run") / "state.pt").is_file() and not Path(f"{out}.run.old-1").exists()


@pytest.mark.parametrize("command", ["fit", "plan", "eval", "generate"])
def test_an_unreadable_budget_is_refused_before_any_file_is_read(capsys, tmp_path, command):
    """`--mem-budget 2XB` is named before the checkpoint or the data are looked at: neither exists here, and the
    one line on stderr is about the budget."""
    args = [command, "--checkpoint", str(tmp_path / "missing.safetensors"), "--mem-budget", "2XB"]
    if command in ("fit", "plan", "eval"):
        args += ["--data", str(tmp_path / "missing.txt")]
    code, _, err = run(capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert "--mem-budget" in err and "2XB" in err and "missing" not in err
    assert list(tmp_path.iterdir()) == []
