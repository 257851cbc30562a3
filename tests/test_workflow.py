"""Training end to end: multi-step SLiM against full backprop, a real drop in validation bpc, interrupted runs
(in process, by signal, inside a step, during the weight update) resuming to the same weights, refused resumes and
non-finite losses. (Generation and one-step adaptation: test_generation.py, test_evaluation.py.)"""

import pytest
import torch
from helpers import assert_close, save_model, tiny_model


def test_slim_and_full_backprop_train_the_same_model(tmp_path, data_dir):
    """The paper's Figure 4 claim: 100 steps with SLiM at C = 64 and with full backprop, same start and seed."""
    from slimtune.checkpoint import load_checkpoint
    from slimtune.train import FitOptions, fit

    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=32, ffn_dim=64)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()), dtype=torch.uint8)
    runs = {}
    for c in (64, 300):
        options = FitOptions(
            seq_len=300, batch_size=2, steps=100, chunk_size=c, optimizer="adam", lr=1e-3, device="cpu"
        )
        runs[c] = fit(load_checkpoint(base), data, tmp_path / f"c{c}.safetensors", options)
    assert runs[64].losses == pytest.approx(runs[300].losses, rel=1e-4)
    slim, full = (load_checkpoint(tmp_path / f"c{c}.safetensors").tensors for c in (64, 300))
    for name in full:
        assert_close(slim[name], full[name], 1e-4, name)
    assert runs[300].losses[-1] < runs[300].losses[0] - 1.0  # it did train


def test_sixty_steps_lower_validation_bpc_by_one(capsys, tmp_path, data_dir):
    """From a random-init d = 64, 2-layer, 4-head checkpoint, 60 adam steps under --mem-budget 2GB."""
    import json

    from slimtune.cli import main

    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_model(base, model)
    bpc = {}
    assert (
        main(
            [
                "fit",
                "--checkpoint",
                str(base),
                "--data",
                str(data_dir / "ptb.test.txt"),
                "--out",
                str(tuned),
                "--steps",
                "60",
                "--mem-budget",
                "2GB",
                "--lr",
                "3e-3",
                "--batch-size",
                "4",
                "--seq-len",
                "512",
            ]
        )
        == 0
    )
    for name, path in (("before", base), ("after", tuned)):
        capsys.readouterr()
        assert (
            main(
                [
                    "eval",
                    "--checkpoint",
                    str(path),
                    "--data",
                    str(data_dir / "ptb.valid.txt"),
                    "--seq-len",
                    "512",
                    "--max-bytes",
                    "100000",
                    "--json",
                ]
            )
            == 0
        )
        bpc[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bpc"]
    assert bpc["before"] - bpc["after"] >= 1.0, bpc


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, data_dir):
    from slimtune.checkpoint import load_checkpoint
    from slimtune.train import FitOptions, fit

    model = tiny_model("favor+", True, dtype=torch.float32)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:100000]), dtype=torch.uint8)

    def options(run_dir, resume=False):
        return FitOptions(
            seq_len=64,
            batch_size=2,
            steps=6,
            chunk_size=16,
            optimizer="adam",
            lr=3e-3,
            device="cpu",
            schedule="cosine",
            warmup=2,
            accumulate=2,
            clip_grad=1.0,
            run_dir=str(run_dir),
            save_every=1,
            resume=resume,
        )

    def stop_at_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(load_checkpoint(base), data, out, options(tmp_path / "run"), on_step=stop_at_3)
    assert not out.exists()
    resumed = fit(load_checkpoint(base), data, out, options(tmp_path / "run", resume=True))
    whole = fit(load_checkpoint(base), data, tmp_path / "whole.safetensors", options(tmp_path / "run2"))
    assert resumed.losses == whole.losses and len(whole.losses) == 6
    for name, t in load_checkpoint(tmp_path / "whole.safetensors").tensors.items():
        assert torch.equal(load_checkpoint(out).tensors[name], t), name
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_settings(tmp_path, data_dir):
    from slimtune.checkpoint import load_checkpoint
    from slimtune.errors import SlimtuneError
    from slimtune.train import FitOptions, fit

    model = tiny_model("sqr", True, dtype=torch.float32)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:20000]), dtype=torch.uint8)
    fit(
        load_checkpoint(base),
        data,
        tmp_path / "a.safetensors",
        FitOptions(seq_len=32, steps=2, chunk_size=8, device="cpu", run_dir=str(tmp_path / "run")),
    )
    with pytest.raises(SlimtuneError, match="lr"):
        fit(
            load_checkpoint(base),
            data,
            tmp_path / "b.safetensors",
            FitOptions(
                seq_len=32, steps=2, chunk_size=8, lr=0.5, device="cpu", run_dir=str(tmp_path / "run"), resume=True
            ),
        )


def test_nonfinite_loss_stops_or_skips(tmp_path, data_dir):
    from slimtune.checkpoint import load_checkpoint
    from slimtune.errors import SlimtuneError
    from slimtune.train import FitOptions, fit

    model = tiny_model("sqr", True, dtype=torch.float32)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:20000]), dtype=torch.uint8)
    blow_up = dict(
        seq_len=32, steps=3, chunk_size=8, optimizer="sgd", lr=1e30, device="cpu", run_dir=str(tmp_path / "run")
    )
    with pytest.raises(SlimtuneError, match="non-finite loss or gradient at step"):
        fit(load_checkpoint(base), data, tmp_path / "a.safetensors", FitOptions(**blow_up))
    assert not (tmp_path / "a.safetensors").exists()
    assert (tmp_path / "run" / "state.pt").exists()
    warnings = []  # step 1 is finite and throws the weights far out; steps 2 and 3 are skipped and counted
    result = fit(
        load_checkpoint(base),
        data,
        tmp_path / "b.safetensors",
        FitOptions(**{**blow_up, "run_dir": str(tmp_path / "run2"), "skip_nonfinite": True}),
        on_warning=warnings.append,
    )
    assert result.metrics["skipped_steps"] == 2 and len(warnings) == 2 and len(result.losses) == 1


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_the_run_and_exits_with_the_conventional_code(tmp_path, data_dir, signame, code):
    import signal
    import subprocess
    import sys
    import time

    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    out = tmp_path / "o.safetensors"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slimtune",
            "fit",
            "--checkpoint",
            str(base),
            "--data",
            str(data_dir / "ptb.test.txt"),
            "--out",
            str(out),
            "--steps",
            "100000",
            "--seq-len",
            "256",
            "--chunk-size",
            "64",
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "o.safetensors.run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert (tmp_path / "o.safetensors.run" / "state.pt").exists() and not out.exists()


def test_interrupt_inside_a_step_resumes_to_the_same_weights(tmp_path, data_dir, monkeypatch):
    """Ctrl-C in the middle of step 3 (after its data was drawn): the resumed run redraws that step."""
    from slimtune import train
    from slimtune.checkpoint import load_checkpoint

    model = tiny_model("favor+", True, dtype=torch.float32)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:100000]), dtype=torch.uint8)

    def options(run, resume=False):
        return train.FitOptions(
            seq_len=48, batch_size=2, steps=5, chunk_size=16, lr=3e-3, device="cpu", run_dir=str(run), resume=resume
        )

    real, calls = train.slim_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "slim_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.fit(load_checkpoint(base), data, tmp_path / "a.safetensors", options(tmp_path / "run"))
    monkeypatch.setattr(train, "slim_step", real)
    resumed = train.fit(load_checkpoint(base), data, tmp_path / "a.safetensors", options(tmp_path / "run", True))
    whole = train.fit(load_checkpoint(base), data, tmp_path / "b.safetensors", options(tmp_path / "run2"))
    assert resumed.losses == whole.losses
    for name, t in load_checkpoint(tmp_path / "b.safetensors").tensors.items():
        assert torch.equal(load_checkpoint(tmp_path / "a.safetensors").tensors[name], t), name


def test_ctrl_c_during_the_weight_update_resumes_to_the_same_weights(tmp_path, data_dir, monkeypatch):
    """A real SIGINT that arrives while step 3 updates the weights (after the optimizer's update, before the step is
    counted): the update and the step count are saved together, so the resumed run neither loses nor repeats it."""
    import signal

    from slimtune import train
    from slimtune.checkpoint import load_checkpoint

    base = save_model(tmp_path / "base.safetensors", tiny_model("sqr", True, dtype=torch.float32))
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:100000]), dtype=torch.uint8)

    def options(run, resume=False):
        return train.FitOptions(
            seq_len=48, batch_size=2, steps=5, chunk_size=16, lr=3e-3, device="cpu", run_dir=str(run), resume=resume
        )

    real, calls = torch.optim.Adam.step, []

    def update_then_ctrl_c(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # Python raises KeyboardInterrupt at its next chance to
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", update_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train.fit(load_checkpoint(base), data, tmp_path / "a.safetensors", options(tmp_path / "run"))
    monkeypatch.setattr(torch.optim.Adam, "step", real)
    resumed = train.fit(load_checkpoint(base), data, tmp_path / "a.safetensors", options(tmp_path / "run", True))
    whole = train.fit(load_checkpoint(base), data, tmp_path / "b.safetensors", options(tmp_path / "run2"))
    assert resumed.first_step == 3 and resumed.losses == whole.losses
    for name, t in load_checkpoint(tmp_path / "b.safetensors").tensors.items():
        assert torch.equal(load_checkpoint(tmp_path / "a.safetensors").tensors[name], t), name
