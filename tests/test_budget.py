"""The budget as a promise, end to end in fresh processes as a user runs them: `plan` and `fit` choose the same
largest C that fits, the run's measured peak (VmHWM) stays inside the budget and near the prediction, and a given C
that the budget cannot hold is refused before any work. The full sweep over shapes is benchmarks/planner_sweep.py."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.planner import HEADROOM, Workload, plan_chunk_size

SHAPES = {  # small, quick shapes unlike the calibrated one (d 256, 3 layers, post-LN, batch 1, adam, fp32)
    "pre-LN, batch 2, adam": dict(model=dict(hidden_dim=128, n_layers=4, ffn_dim=512, n_heads=2, on_gptln=False),
                                  args=["--batch-size", 2, "--optimizer", "adam"]),
    "favor+, sgd": dict(model=dict(hidden_dim=128, n_layers=3, ffn_dim=512, n_heads=2, feature_type="favor+"),
                        args=["--optimizer", "sgd"]),
    "bf16, adamw, held-out eval": dict(model=dict(hidden_dim=192, n_layers=3, ffn_dim=768, n_heads=4),
                                       args=["--optimizer", "adamw", "--precision", "bf16", "--eval-fraction", 0.05]),
}  # fmt: skip
L = 8192


def _slimtune(*args):
    cmd = [sys.executable, "-m", "slimtune", *map(str, args), "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_and_fit_agree_and_fit_stays_inside_its_budget(tmp_path, data_dir, shape):
    spec = SHAPES[shape]
    model = tiny_model(dtype=torch.float32, **spec["model"])
    ckpt = save_model(tmp_path / "m.safetensors", model)
    # The same inputs: plan counts the data file fit will read (the held-out share is part of the same file).
    plan_args = [a for a in spec["args"] if a not in ("--eval-fraction", 0.05)]
    plan_args += ["--data", data_dir / "tinyshakespeare.txt", "--no-compare"]  # this plan only (fit's)
    # The largest C that fits (`max`): the memory edge this test centres the budget on. `auto` picks among the C
    # that fit by measured time, which one process may see otherwise than the next.
    plan_args += ["--chunk-size", "max"]
    loose = _json(_slimtune("plan", "--checkpoint", ckpt, "--seq-len", L, "--mem-budget", "4GB", "--json", *plan_args))
    peaks = {c["chunk_size"]: c["predicted_peak_bytes"] for c in loose["candidates"]}
    first = _json(_slimtune("plan", "--checkpoint", ckpt, "--seq-len", L, "--mem-budget",
                            int((peaks[512] + peaks[2048]) / 2), "--json", *plan_args))  # fmt: skip
    # A budget whose usable share lies halfway between the chosen C's prediction and the next C's: the choice is
    # then as far from either edge as the grid allows, well beyond the megabyte by which RSS drifts.
    usable = first["budget_bytes"] * (1 - HEADROOM) + (first["next_over_bytes"] - first["margin_bytes"]) / 2
    budget = int(usable / (1 - HEADROOM))
    planned = _json(
        _slimtune("plan", "--checkpoint", ckpt, "--seq-len", L, "--mem-budget", budget, "--json", *plan_args)
    )
    assert planned["chunk_size"] == first["chunk_size"]
    assert min(planned["margin_bytes"], planned["next_over_bytes"]) > 2e6
    out = tmp_path / "out.safetensors"
    common = ["--checkpoint", ckpt, "--data", data_dir / "tinyshakespeare.txt", "--seq-len", L, "--steps", 2]
    fitted = _json(_slimtune("fit", *common, "--out", out, "--mem-budget", budget, "--json", "--chunk-size", "max",
                             *spec["args"]))  # fmt: skip
    assert fitted["chunk_size"] == planned["chunk_size"]
    assert 256 < fitted["chunk_size"] < 2048
    peak, predicted = fitted["peak_memory_bytes"], fitted["plan"]["predicted_peak_bytes"]
    assert peak <= budget, f"measured {peak / 1e6:.1f} MB over the budget {budget / 1e6:.1f} MB"
    # Under by no more than the headroom covers; over by at most 12 %: the pre-LN batch-2 shape predicts 8-10 %
    # high (its chunk term, from the calibrated heap factor) and reached 10.1 % once in CI. The 10 % goal is held
    # by the sweep over 24 shapes (benchmarks/planner_sweep.py), not by this smoke test of three.
    error = predicted / peak - 1
    assert -HEADROOM <= error <= 0.12, f"predicted {predicted / 1e6:.1f} MB, measured {peak / 1e6:.1f} MB"

    # C = 2048 is predicted well over the budget (half the gap to C = 512 above it): forcing it under that budget
    # is refused before any work, naming the C that fits.
    refused = _slimtune("fit", *common, "--out", tmp_path / "o2.safetensors", "--mem-budget", budget,
                        "--chunk-size", 2048, *spec["args"])  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"the largest C that fits is {fitted['chunk_size']}" in refused.stderr
    assert not (tmp_path / "o2.safetensors").exists()


def test_a_favor_checkpoint_plans_without_a_feature_draw_and_keeps_none():
    """A FAVOR+ checkpoint holds no feature draw; the planner's probe steps draw one and leave the model as it was."""
    model = tiny_model("favor+", dtype=torch.float32, hidden_dim=32, n_heads=2)
    for layer in model.layers:
        layer.attention.projection = None
    plan = plan_chunk_size(model, Workload(1024, 1, "sgd"), "2GB")
    assert plan.chunk_size == 1024
    assert all(layer.attention.projection is None for layer in model.layers)
