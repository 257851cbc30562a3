"""The plan of a run (slimtune/runplan.py): how a chunk_size option reads (auto, None, full, an integer, or an error
naming chunk_size); what `fixed` derives (C capped at L, weight-gradient batching, the heap policy, dtypes, and the
trainable and frozen parameters against a count made here from the model's shapes); the JSON round trip a run state
relies on; the out-of-memory fallback; and resolve_run's sources of C."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import a_plan, tiny_model

from slimtune.breakdown import StepBreakdown
from slimtune.choices import ChunkRule, Precision
from slimtune.errors import ConfigError
from slimtune.options import FitOptions, chunk_rule
from slimtune.planner import Candidate
from slimtune.runplan import SOURCES, RunPlan, after_out_of_memory, chunk_request, plan_for_chunk, resolve_run


@pytest.mark.parametrize(
    "value, expected",
    [("auto", None), ("max", None), (None, None), ("full", 512), ("64", 64), (64, 64), (" 7 ", 7), (1, 1)],
)
def test_chunk_request_reads_each_form(value, expected):
    assert chunk_request(value, 512) == expected


def test_the_chunk_rule_is_the_fastest_unless_max_is_asked():
    assert chunk_rule("max") == ChunkRule.LARGEST
    assert {chunk_rule(v) for v in ("auto", None, 64, "full")} == {ChunkRule.FASTEST}


@pytest.mark.parametrize("value", ["x", "", "0", 0, -3, "-3", "1.5", 1.5, "064", True, False, "Full", "AUTO"])
def test_chunk_request_refuses_the_rest_naming_chunk_size(value):
    with pytest.raises(ConfigError, match="`chunk_size` must be auto, max, full or an integer >= 1") as info:
        chunk_request(value, 512)
    assert info.value.params == ("chunk_size",)


def _hand_count(V, d, F, n_layers):
    """Parameters by the contract's tensor list: embedding [V, d/2]; per layer q, k, v (d x d + d each), U
    (F x d + F), V (d x F + d), two layer norms (2 d each); the output map (V x d + V)."""
    return V * d // 2 + n_layers * (3 * (d * d + d) + (F * d + F) + (d * F + d) + 4 * d) + V * d + V


def test_fixed_counts_trainable_and_frozen_parameters():
    model = tiny_model(dtype=torch.float32)  # V 256, d 16, F 32, 2 layers
    plan = plan_for_chunk(model, FitOptions(seq_len=64, device="cpu"), 16)
    assert (plan.trainable_parameters, plan.frozen_parameters) == (_hand_count(256, 16, 32, 2), 0)
    model.input_map.weight.requires_grad_(False)  # 256 x 8
    model.layers[0].layernorm1.bias.requires_grad_(False)  # 16
    model.layers[1].U_map.weight.requires_grad_(False)  # 32 x 16
    plan = plan_for_chunk(model, FitOptions(seq_len=64, device="cpu"), 16)
    frozen = 256 * 8 + 16 + 32 * 16
    assert plan.frozen_parameters == frozen
    assert plan.trainable_parameters == _hand_count(256, 16, 32, 2) - frozen


def test_fixed_derives_the_rest_of_the_plan():
    model = tiny_model(dtype=torch.float64)
    plan = plan_for_chunk(model, FitOptions(seq_len=64, device="cpu"), 1000)
    assert plan.chunk_size == 64 and plan.chunk_source == "given"  # C >= L: full backprop, C = L
    assert plan.batch_weight_grads is False  # one chunk: nothing to batch
    assert (plan.device, plan.world_size, plan.threads) == ("cpu", 1, torch.get_num_threads())
    assert (plan.weight_dtype, plan.compute_dtype, plan.heap, plan.planner) == ("float64", "float64", "fast", None)
    small = plan_for_chunk(model, FitOptions(seq_len=64, batch_size=2, device="cpu"), 16)
    assert small.chunk_size == 16 and small.batch_weight_grads is True  # 4 chunks of 32 rows < 256
    assert plan_for_chunk(model, FitOptions(seq_len=64, batch_size=16, device="cpu"), 16).batch_weight_grads is False
    off = plan_for_chunk(model, FitOptions(seq_len=64, device="cpu", batch_weight_grads=False), 16)
    assert off.batch_weight_grads is False
    # Asked for where slim_step cannot batch (32 x 16 rows >= 256; one chunk): the plan says what will happen.
    asked = dict(device="cpu", batch_weight_grads=True)
    assert plan_for_chunk(model, FitOptions(seq_len=64, batch_size=16, **asked), 16).batch_weight_grads is False
    assert plan_for_chunk(model, FitOptions(seq_len=64, **asked), 64).batch_weight_grads is False
    assert plan_for_chunk(model, FitOptions(seq_len=64, **asked), 16).batch_weight_grads is True
    bf16 = plan_for_chunk(tiny_model(dtype=torch.float32), FitOptions(seq_len=64, precision="bf16", device="cpu"), 16)
    assert (bf16.weight_dtype, bf16.compute_dtype, bf16.batch_weight_grads) == ("float32", "bfloat16", False)
    assert plan_for_chunk(model, FitOptions(seq_len=64, heap="system", device="cpu"), 16).heap == ""
    planner = a_plan(heap="tight", batch_weight_grads=False, chunk_size=16)
    planned = plan_for_chunk(
        model, FitOptions(seq_len=64, device="cpu"), 16, source="planned", planner=planner, world=2
    )
    assert (planned.heap, planned.batch_weight_grads, planned.chunk_source, planned.world_size) == (
        "tight",
        False,
        "planned",
        2,
    )
    assert planned.planner == planner


def test_a_run_plan_round_trips_through_json():
    model = tiny_model(dtype=torch.float32)
    candidate = Candidate(8, 100, 0.5, 1.0, True, "fast")
    breakdown = StepBreakdown(runtime=60, chunk=30, states=10, planning=5)
    planner = a_plan(chunk_size=8, heap="fast", batch_weight_grads=True, candidates=[candidate], breakdown=breakdown)
    plan = plan_for_chunk(model, FitOptions(seq_len=32, device="cpu"), 8, source="checked", planner=planner)
    text = json.dumps(plan.to_json())
    again = RunPlan.from_json(json.loads(text))
    assert again == plan and isinstance(again, RunPlan)
    assert set(plan.to_json()) == {
        "chunk_size",
        "chunk_source",
        "batch_weight_grads",
        "heap",
        "threads",
        "device",
        "world_size",
        "weight_dtype",
        "precision",
        "compute_dtype",
        "trainable_parameters",
        "frozen_parameters",
        "planner",
    }
    shown = plan.to_json()["planner"]["breakdown"]  # the JSON names the lines in words, with their total
    assert shown == {"runtime": 60, "data": 0, "gradients": 0, "optimizer": 0, "chunk": 30, "states": 10,
                     "gradient batching": 0, "copies": 0, "optimizer step": 0, "export": 0, "planning": 5,
                     "total": 105}  # fmt: skip
    assert again.planner.breakdown.judged().total == 100  # the probes' own peak is not judged


def test_a_run_state_written_before_the_precision_field_reads_back():
    """A run state saved by the previous release carries the compute dtype as a string, not the precision."""
    model = tiny_model(dtype=torch.float32)
    for asked, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        plan = plan_for_chunk(model, FitOptions(seq_len=32, device="cpu", precision=asked), 8)
        old = {k: v for k, v in plan.to_json().items() if k != "precision"}
        assert old["compute_dtype"] == dtype
        assert RunPlan.from_json(old) == plan


def test_the_out_of_memory_fallback_takes_the_next_smaller_c_and_says_so():
    options = FitOptions(seq_len=64, device="cpu")
    plan = plan_for_chunk(tiny_model(dtype=torch.float32), options, 32, source="planned")
    smaller = after_out_of_memory(plan, options)
    assert smaller.chunk_size == 16 and smaller.chunk_source == "planned, then out of memory"
    assert smaller.to_json() | {"chunk_size": 32, "chunk_source": "planned"} == plan.to_json()
    assert plan.chunk_size == 32  # frozen: the original plan is unchanged
    from_full = after_out_of_memory(plan_for_chunk(tiny_model(dtype=torch.float32), options, 64), options)
    assert from_full.chunk_size == 32  # C = L falls back to the grid below L
    assert after_out_of_memory(replace(plan, chunk_size=1), options) is None  # nothing below C = 1


def test_the_fallback_keeps_batching_only_where_slim_step_can_batch():
    model = tiny_model(dtype=torch.float32)
    batched = plan_for_chunk(model, FitOptions(seq_len=64, batch_size=4, device="cpu"), 64)
    assert batched.batch_weight_grads is False  # one chunk
    batched = replace(batched, batch_weight_grads=True)  # as a saved run's plan might say
    options = FitOptions(seq_len=64, batch_size=16, device="cpu")
    assert after_out_of_memory(batched, options).batch_weight_grads is False  # 16 x 32 rows: too many to batch
    assert after_out_of_memory(batched, FitOptions(seq_len=64, device="cpu")).batch_weight_grads is True
    bf16 = replace(batched, precision=Precision.BF16)
    assert after_out_of_memory(bf16, FitOptions(seq_len=64, device="cpu")).batch_weight_grads is False  # autocast


def test_resolve_run_takes_a_given_c_without_planning(monkeypatch):
    from slimtune import planner

    monkeypatch.setattr(planner, "plan_chunk_size", lambda *a, **k: pytest.fail("planned although C was given"))
    model = tiny_model(dtype=torch.float32)
    run = resolve_run(model, FitOptions(seq_len=64, chunk_size="16", device="cpu"))
    assert (run.chunk_size, run.chunk_source, run.planner) == (16, "given", None)
    full = resolve_run(model, FitOptions(seq_len=64, chunk_size="full", device="cpu"))
    assert (full.chunk_size, full.chunk_source) == (64, "given")
    assert SOURCES == ("planned", "checked", "given", "resumed")


def test_resolve_run_plans_auto_and_checks_a_given_c_against_a_budget():
    model = tiny_model(dtype=torch.float32)
    planned = resolve_run(model, FitOptions(seq_len=64, chunk_size="auto", mem_budget="4GB", device="cpu"))
    assert planned.chunk_source == "planned" and planned.planner.chunk_size == planned.chunk_size
    assert 1 <= planned.chunk_size <= 64
    checked = resolve_run(model, FitOptions(seq_len=64, chunk_size=8, mem_budget="4GB", device="cpu"))
    assert (checked.chunk_size, checked.chunk_source) == (8, "checked") and checked.planner is not None
