"""Sampling in recurrent mode (slimtune/generation.py): greedy generation equals the argmax of the full forward
pass recomputed over the whole sequence at every step, whatever the prompt's chunk size; top-k 1 is greedy at any
temperature; a seed repeats a sample, also for a FAVOR+ model's feature draw; bad arguments raise a ConfigError
naming them; and under a memory budget the prompt runs at the C the plan chooses (smaller for a smaller budget),
sampling as the full forward pass does, and an impossible budget is refused."""

import json

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune import eval_plan
from slimtune.cli import main
from slimtune.errors import ConfigError, DataError, OutOfBudgetError
from slimtune.generation import generate
from slimtune.planner import HEADROOM


def _greedy_by_full_forward(model, prompt: bytes, n: int) -> bytes:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return bytes(ids[len(prompt) :])


def test_recurrent_generation_matches_full_forward():  # moved from test_workflow.py
    model = tiny_model("elu+1", True, dtype=torch.float64)
    prompt = b"Hello, Performer"
    text = generate(model, prompt, 20, temperature=0, chunk_size=5)
    ids = list(prompt)
    for _ in range(20):  # greedy, recomputing the whole sequence each time
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert text == bytes(ids[len(prompt) :])


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("feature, post", [("sqr", False), ("favor+", True)])
def test_greedy_is_the_argmax_of_the_full_forward_pass(feature, post, chunk_size):
    model = tiny_model(feature, post, dtype=torch.float64, seed=2)
    prompt = "Ünïcödé prompt"  # text is encoded as UTF-8
    text = generate(model, prompt, 15, temperature=0, chunk_size=chunk_size)
    assert len(text) == 15
    assert text == _greedy_by_full_forward(model, prompt.encode(), 15)


def test_top_1_is_greedy_at_any_temperature():
    model = tiny_model("relu", True, dtype=torch.float64, seed=3)
    expected = _greedy_by_full_forward(model, b"abc", 12)
    for temperature in (0.5, 1.0, 5.0):
        assert generate(model, b"abc", 12, temperature=temperature, top_k=1, seed=int(10 * temperature)) == expected


def test_a_seed_repeats_the_sample_and_samples_stay_in_the_top_k():
    model = tiny_model("favor+", True, dtype=torch.float32, seed=4)
    a = generate(model, b"seed", 40, temperature=1.5, seed=7)
    b = generate(model, b"seed", 40, temperature=1.5, seed=7)
    c = generate(model, b"seed", 40, temperature=1.5, seed=8)
    assert a == b and a != c and len(a) == 40
    # With top_k = 3, every sampled byte is among the 3 likeliest of the full forward pass after its prefix.
    prompt = b"top k"
    sample = generate(model, prompt, 20, temperature=2.0, top_k=3, seed=1)
    ids = list(prompt)
    model.redraw_features(torch.Generator().manual_seed(1))  # the draw the seed fixed
    with torch.no_grad():
        for byte in sample:
            top = model(torch.tensor([ids]))[0, -1].topk(3).indices.tolist()
            assert byte in top
            ids.append(byte)


def test_no_bytes_is_empty():
    assert generate(tiny_model(dtype=torch.float32), b"x", 0) == b""


@pytest.mark.parametrize(
    "bad",
    [dict(n_bytes=-1), dict(temperature=-0.1), dict(top_k=0), dict(top_k=-5)],
    ids=lambda b: next(iter(b)),
)
def test_bad_arguments_name_their_parameters(bad):
    args = dict(n_bytes=5, temperature=0.8, top_k=None) | bad
    with pytest.raises(ConfigError) as info:
        generate(tiny_model(dtype=torch.float32), b"prompt", args.pop("n_bytes"), **args)
    assert info.value.params == ("n_bytes", "temperature", "top_k")
    assert "`n_bytes` >= 0" in str(info.value) and "`top_k` >= 1" in str(info.value)


def test_an_empty_prompt_and_bytes_beyond_the_vocabulary_are_refused():
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(tiny_model(dtype=torch.float32), "", 5)
    small = tiny_model(dtype=torch.float32, vocab_size=128)
    with pytest.raises(DataError, match="vocabulary has only 128 ids"):
        generate(small, "café", 5)
    assert len(generate(small, "cafe", 5, temperature=0)) == 5


RUNTIME = 100_000_000  # what the process holds as the plan sees it (the `runtime` fixture)


@pytest.fixture
def runtime(monkeypatch):
    """The process as the plan measures it, fixed (RUNTIME bytes, no probe peak read): a budget picks the same C on
    any machine."""
    monkeypatch.setattr(eval_plan, "held_bytes", lambda device: RUNTIME)
    monkeypatch.setattr(eval_plan, "new_peak_window", lambda: False)


def test_the_prompt_runs_at_the_planned_chunk_and_samples_as_the_full_forward(runtime):
    model = tiny_model("relu", False, dtype=torch.float64, seed=3)
    prompt = b"a prompt that is longer than the smallest chunk the plan picks, " * 5
    expected = _greedy_by_full_forward(model, prompt, 8)
    chosen = []
    for extra in (50e3, 200e3, 20e6):
        plans = []
        budget = int((RUNTIME + extra) / (1 - HEADROOM))
        assert generate(model, prompt, 8, temperature=0, mem_budget=budget, on_plan=plans.append) == expected
        assert plans[0].budget_bytes == budget and plans[0].predicted_peak_bytes <= budget
        chosen.append(plans[0].chunk_size)
    assert chosen == sorted(chosen) and chosen[0] < 64 and chosen[-1] == len(prompt), chosen


def test_a_given_chunk_is_checked_against_a_budget(runtime):
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(OutOfBudgetError, match="chunk size 320 .* the largest C that fits is"):
        generate(model, b"x" * 320, 1, chunk_size="full", mem_budget=int((RUNTIME + 50e3) / (1 - HEADROOM)))
    plans = []
    generate(model, b"x" * 320, 1, chunk_size=7, on_plan=plans.append)
    assert plans == [None]  # a given C without a budget is taken as it is


def test_an_impossible_budget_is_refused():
    with pytest.raises(OutOfBudgetError, match="cannot fit even C = 1") as info:
        generate(tiny_model(dtype=torch.float32), b"prompt", 5, mem_budget="1MB")
    assert "mem_budget" in info.value.params


def test_the_command_line_reports_the_prompt_plan(capsys, tmp_path):
    ckpt = save_model(tmp_path / "m.safetensors", tiny_model(dtype=torch.float32))
    args = ["generate", "--checkpoint", ckpt, "--prompt", "Hello", "--bytes", 3, "--device", "cpu", "--json"]
    assert main([str(a) for a in [*args, "--mem-budget", "90%"]]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["chunk_size"] == 5 and result["bytes"] == 3
    assert 0 < result["predicted_peak_bytes"] <= result["budget_bytes"] and result["peak_memory_bytes"] > 0
    assert main([str(a) for a in [*args, "--mem-budget", "1MB"]]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "--mem-budget" in stderr
