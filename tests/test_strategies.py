"""Parameter-memory strategies planned with C (slimtune/strategies.py, `slimtune plan`): what is compared, the
parameters each trains (counted here from the shapes), the measured lines that set them apart, and the exit-2
message that names the strategies that fit."""

import json

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.choices import BaseDtype, Optimizer
from slimtune.planner import Workload
from slimtune.pretrained import PerformerLM
from slimtune.strategies import Strategy, compare, lineup


def _cli(capsys, *args):
    from slimtune.cli import main

    code = main([str(a) for a in args] + ["--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _lora_parameters(config, rank: int) -> int:
    """rank x (in + out) for q, k, v (d -> d), U (d -> ffn) and V (ffn -> d) of every layer."""
    d, f = config.hidden_dim, config.ffn_dim
    return config.n_layers * rank * (3 * 2 * d + 2 * (d + f))


def _wide(tmp_path):
    """One layer with a very wide feed-forward map: 16.8M parameters (67 MB), cheap to step at L = 64."""
    model = tiny_model(dtype=torch.float32, hidden_dim=64, n_layers=1, ffn_dim=131072, n_heads=2)
    return save_model(tmp_path / "wide.safetensors", model), 4 * sum(p.numel() for p in model.parameters())


def test_the_lineup_is_full_with_three_optimizers_then_lora_on_each_base():
    full = lineup(Strategy(Optimizer.ADAMW))
    assert [(s.optimizer, s.lora_rank, s.base_dtype) for s in full] == [
        ("adamw", 0, "fp32"), ("adam", 0, "fp32"), ("adafactor", 0, "fp32"), ("sgd", 0, "fp32"),
        ("adamw", 8, "fp32"), ("adamw", 8, "bf16"), ("adamw", 8, "int8"), ("adamw", 8, "nf4"),
    ]  # fmt: skip
    asked = Strategy(Optimizer.SGD, lora_rank=4, base_dtype=BaseDtype.NF4, lora_targets=("q_map",), seed=3)
    found = lineup(asked)
    assert asked in found and len(found) == 7
    assert [(s.optimizer, s.lora_rank, s.base_dtype) for s in found[3:]] == [
        ("sgd", 4, "fp32"),
        ("sgd", 4, "bf16"),
        ("sgd", 4, "int8"),
        ("sgd", 4, "nf4"),
    ]
    assert all(s.lora_targets == ("q_map",) and s.seed == 3 for s in found)


def test_compare_plans_each_strategy_with_its_own_trainable_parameters_and_memory(tmp_path):
    """A generous budget: every strategy trains full backprop (C = L) as the largest that fits (rule max: at L = 64
    the time model may find C = 32 faster, its 17 MB blocks kept by the fast heap where L's 34 MB ones fault). What
    sets the predictions apart is measured: Adam's state (two moments of every parameter) over sgd's none; LoRA's
    missing weight gradients."""
    path, weights = _wide(tmp_path)  # 67 MB of weights: far above the runtime's noise between probes
    model = PerformerLM.from_pretrained(path)
    total = sum(p.numel() for p in model.parameters())
    asked = Strategy(Optimizer.ADAM, lora_rank=2)
    seen, stages = {}, []
    found = compare(
        model, asked, Workload(64), "95%", heap="managed", rule="max",
        on_planned=lambda s, plan: seen.setdefault(s, (sum(p.numel() for p in model.parameters() if p.requires_grad),
                                                       plan.breakdown)),
        on_stage=lambda done, total, name: stages.append((done, total, name)),
    )  # fmt: skip
    assert [d for d, _, _ in stages] == [0, 1, 2, 3, 4, 5, 6] and stages[-1][2] == "LoRA r2, nf4 base, adam"
    assert found.error is None and found.asked is not None
    rows = {(r.strategy.optimizer, r.strategy.lora_rank, r.strategy.base_dtype): r for r in found.rows}
    assert [r.asked for r in found.rows] == [False, False, False, True, False, False, False]
    assert all(r.chunk_size == 64 for r in found.rows)
    adapters = _lora_parameters(model.config, 2)
    for key, row in rows.items():
        assert row.trainable_parameters == (adapters if key[1] else total), key
        assert seen[row.strategy][0] == row.trainable_parameters  # on_planned saw the model as that strategy trains
    state = {(s.optimizer, s.lora_rank, s.base_dtype): lines.optimizer for s, (_, lines) in seen.items()}
    assert state[("adam", 0, "fp32")] == 2 * weights and state[("sgd", 0, "fp32")] == 0  # measured, not assumed
    peak = {key: row.predicted_peak_bytes for key, row in rows.items()}
    full_adam, full_sgd = peak[("adam", 0, "fp32")], peak[("sgd", 0, "fp32")]
    # The totals differ by the moments less what the runtime line (RSS) moved between the two probes.
    assert full_adam - full_sgd >= 1.5 * weights
    assert peak[("adam", 2, "fp32")] < full_sgd - 0.8 * weights  # no weight gradients, no moments
    assert found.asked.chunk_size == rows[("adam", 2, "fp32")].chunk_size
    q_map = model.layers[0].attention.q_map  # converted in place, as documented: the last, nf4
    assert q_map.weight is None and q_map.quantized.format == "nf4"


def test_plan_exit_2_names_the_strategies_that_fit_when_the_asked_one_does_not(capsys, tmp_path):
    """The budget halfway between LoRA's prediction at C = 1 and full fine-tuning with adam's (which holds the
    weights four times over: weights, gradients, two moments), each from its own plan: adam fits no C, LoRA does."""
    path, weights = _wide(tmp_path)

    def at_one(*args):
        code, out, err = _cli(capsys, "plan", "--checkpoint", path, "--seq-len", 64, "--no-compare", "--json", *args)
        assert code == 0, err
        return next(c for c in json.loads(out.strip().splitlines()[-1])["candidates"] if c["chunk_size"] == 1)

    full, adapted = at_one()["predicted_peak_bytes"], at_one("--lora-rank", 8)["predicted_peak_bytes"]
    assert full - adapted > 1.5 * weights  # gradients and two moments of 67 MB of weights (3x, less the noise)
    budget = int((full + adapted) / 2 / 0.95)
    code, out, err = _cli(capsys, "plan", "--checkpoint", path, "--seq-len", 64, "--mem-budget", budget)
    assert code == 2 and out == ""
    message = err.strip().splitlines()[-1]
    assert message.startswith("slimtune: error: ") and "these strategies fit:" in message, message
    assert "LoRA r8, fp32 base, adam at C = " in message and "--lora-rank=8" in message
    assert "full fine-tuning, adam at C" not in message


def test_plan_json_reports_every_strategy_and_the_run_of_the_asked_one(capsys, tmp_path):
    path = save_model(tmp_path / "m.safetensors", tiny_model(dtype=torch.float32, hidden_dim=32, n_layers=2,
                                                             ffn_dim=64, n_heads=2))  # fmt: skip
    config = PerformerLM.from_pretrained(path).config
    args = ["plan", "--checkpoint", path, "--seq-len", 64, "--mem-budget", "95%", "--lora-rank", 3, "--json"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    names = [row["name"] for row in result["strategies"]]
    assert names == ["full fine-tuning, adam", "full fine-tuning, adafactor", "full fine-tuning, sgd",
                     "LoRA r3, fp32 base, adam", "LoRA r3, bf16 base, adam", "LoRA r3, int8 base, adam",
                     "LoRA r3, nf4 base, adam"]  # fmt: skip
    assert [row["asked"] for row in result["strategies"]] == [False, False, False, True, False, False, False]
    assert result["run"]["trainable_parameters"] == _lora_parameters(config, 3)
    code, out, err = _cli(capsys, *args, "--no-compare")
    assert code == 0, err
    alone = json.loads(out.strip().splitlines()[-1])
    assert alone["strategies"] == [] and alone["run"]["trainable_parameters"] == _lora_parameters(config, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-alpha", 4], "--lora-alpha needs LoRA"),
        (["--base-dtype", "bf16"], "--base-dtype=bf16 needs LoRA"),
        (["--base-dtype", "nf4"], "--base-dtype=nf4 needs LoRA"),
        (["--lora-rank", 2, "--lora-targets", "q_map,W_map"], "unknown W_map"),
    ],
)
def test_plan_refuses_lora_flags_that_make_no_sense(capsys, tmp_path, args, message):
    path = save_model(tmp_path / "m.safetensors", tiny_model(dtype=torch.float32))
    code, out, err = _cli(capsys, "plan", "--checkpoint", path, "--seq-len", 64, *args)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err


def test_a_fit_that_fits_no_c_names_the_strategies_that_do(tmp_path, data_dir):
    """Full fine-tuning with adam needs the weights three times over (gradients, two moments) beside what the process
    holds; LoRA (no base gradients) far less. A budget halfway between their predictions at C = 1, each from its own
    plan in this process, cannot fit full fine-tuning at any C, but LoRA fits. The refusal names LoRA with its C, as
    `plan` would list it, and writes nothing."""
    from slimtune.errors import OutOfBudgetError
    from slimtune.strategies import plan_fit
    from slimtune.train import fit

    path, weights = _wide(tmp_path)
    data = data_dir / "ptb.test.txt"

    def at_one(**lora):
        found = plan_fit(path, seq_len=64, optimizer="adam", data=[data], compare_strategies=False, **lora)
        return next(c for c in found.plan.candidates if c.chunk_size == 1).predicted_peak_bytes

    full, adapted = at_one(), at_one(lora_rank=8)
    assert full - adapted > 1.5 * weights
    out = tmp_path / "never.safetensors"
    budget = int((full + adapted) / 2 / 0.95)
    with pytest.raises(OutOfBudgetError, match=r"cannot fit even C = 1.*these strategies fit: .*LoRA r8.* at C = \d+"):
        fit(path, data, out, seq_len=64, optimizer="adam", mem_budget=budget, run_dir=None)
    assert not out.exists()
