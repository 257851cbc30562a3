"""`slimtune bench` and what it compares: layer checkpointing and bf16 autocast against independent gradients."""

import json

import pytest
import reference
import torch
from helpers import assert_close, projections, rel_err, save_model, tiny_model

from slimtune.bench import checkpointed_step
from slimtune.cli import main
from slimtune.slim import slim_step

L = 100


def windows(B=2, seed=0):
    return torch.randint(0, 256, (B, L + 1), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("post", [True, False], ids=["postLN", "preLN"])
@pytest.mark.parametrize("feature", ["sqr", "favor+"])
def test_layer_checkpointing_is_exact(feature, post):
    model, w = tiny_model(feature, post), windows()
    ref_loss, ref = reference.loss_and_grads(model.state_dict(), model.config.to_dict(), w, None, projections(model))
    loss = checkpointed_step(model, w)
    assert abs(loss - ref_loss) <= 1e-10 * ref_loss
    for name, g in grads(model).items():
        assert_close(g, ref[name], 1e-10, name)


@pytest.mark.parametrize("recovery", ["subtract64", "subtract", "store"])
def test_bf16_slim_is_as_accurate_as_bf16_backprop(recovery):
    """bf16 autocast keeps fp32 weights and states: SLiM at C < L lands as close to the float64 reference as
    bf16 full backprop does, and both within bf16 accuracy."""
    model, w = tiny_model("elu+1", True, dtype=torch.float32, hidden_dim=32, ffn_dim=64), windows()
    ref_loss, ref = reference.loss_and_grads(
        {k: v.double() for k, v in model.state_dict().items()}, model.config.to_dict(), w
    )
    flat = lambda g: torch.cat([g[name].flatten().double() for name in sorted(ref)])  # noqa: E731
    model.zero_grad(set_to_none=True)
    full_loss = slim_step(model, w, L, precision=torch.bfloat16)
    full_err = rel_err(flat(grads(model)), flat(ref))
    model.zero_grad(set_to_none=True)
    loss = slim_step(model, w, 7, recovery=recovery, precision=torch.bfloat16)
    slim_err = rel_err(flat(grads(model)), flat(ref))
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(loss - ref_loss) < 1e-2 * ref_loss and abs(full_loss - ref_loss) < 1e-2 * ref_loss
    assert full_err < 3e-2 and slim_err < 1.5 * full_err + 5e-3, (slim_err, full_err)


@pytest.fixture
def ckpt(tmp_path):
    model = tiny_model("sqr", True, dtype=torch.float32, seed=3, hidden_dim=32, ffn_dim=64)
    path = tmp_path / "model.safetensors"
    save_model(path, model)
    return path, model


def test_bench_measures_every_method(capsys, tmp_path, ckpt):
    path, model = ckpt
    png = tmp_path / "figs" / "tradeoff.png"
    code = main(
        [
            "bench",
            "--checkpoint",
            str(path),
            "--seq-len",
            "1024",
            "--chunks",
            "64,8,2048",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--optimizer",
            "adam",
            "--device",
            "cpu",
            "--plot",
            str(png),
            "--json",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["full backprop", "layer checkpointing", "SLiM C=64", "SLiM C=8"]  # C >= L is skipped
    weights = sum(p.numel() * 4 for p in model.parameters())
    for row in rows.values():
        assert row["error"] is None and len(row["times"]) == 2 and row["median_s"] > 0
        # Adam holds weights, gradients and two moments: a floor that does not come from the tracker.
        assert row["peak_bytes"] >= 4 * weights
    full, layer, slim8 = rows["full backprop"], rows["layer checkpointing"], rows["SLiM C=8"]
    assert full["vs_full_time"] == 1.0
    assert slim8["peak_bytes"] < layer["peak_bytes"] < full["peak_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_recipe_without_full_methods(capsys):
    code = main(
        [
            "bench",
            "--recipe",
            "small",
            "--seq-len",
            "64",
            "--chunks",
            "16",
            "--steps",
            "1",
            "--no-full",
            "--no-checkpointing",
            "--precision",
            "bf16",
            "--json",
        ]
    )
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert code == 0 and [r["method"] for r in rows] == ["SLiM C=16"] and rows[0]["vs_full_time"] is None


def test_bench_with_lora_trains_only_the_adapters(capsys):
    """--lora-rank R measures the adapters on a frozen base: R (in + out) values per map train, and without
    the base's gradients and Adam state full backprop holds less than full fine-tuning's."""

    def bench(*extra):
        args = ["bench", "--recipe", "small", "--seq-len", "64", "--chunks", "16", "--steps", "1", "--warmup", "0",
                "--optimizer", "adam", "--no-checkpointing", "--json", *extra]  # fmt: skip
        assert main(args) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    full, adapted = bench(), bench("--lora-rank", "4")
    d, f, layers = (full["config"][k] for k in ("hidden_dim", "ffn_dim", "n_layers"))
    assert adapted["trainable_parameters"] == layers * 4 * (3 * (d + d) + (d + f) + (f + d))
    assert adapted["lora"]["rank"] == 4 and full["lora"] == {}
    assert full["trainable_parameters"] > 20 * adapted["trainable_parameters"]
    by_method = lambda report: {r["method"]: r for r in report["rows"]}  # noqa: E731
    assert by_method(adapted)["full backprop"]["peak_bytes"] < by_method(full)["full backprop"]["peak_bytes"]
    assert all(r["median_s"] > 0 for r in adapted["rows"])
    bf16 = bench("--lora-rank", "4", "--base-dtype", "bf16")
    assert bf16["precision"] == "bf16"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--chunks", "64,x"], "--chunks"),
        (["--chunks", "0"], "--chunks"),
        (["--recipe", "small"], "exactly one"),
        (["--precision", "fp8"], "--precision"),
        (["--optimizer", "lion"], "--optimizer"),
        (["--emulate-memory", "2GB", "--device", "cpu"], "CUDA"),
        (["--plot", "out.pdf"], ".png"),
        (["--base-dtype", "bf16"], "--lora-rank"),
        (["--lora-rank", "-1"], "--lora-rank"),
        (["--chunks", "512", "--no-full", "--no-checkpointing", "--seq-len", "256"], "nothing to measure"),
    ],
)
def test_bench_bad_input(capsys, tmp_path, ckpt, args, needle):
    code = main(["bench", "--checkpoint", str(ckpt[0]), *args])
    stderr = capsys.readouterr().err
    assert code == 2 and needle in stderr and len(stderr.strip().splitlines()) == 1, stderr
