"""The Trainer (setup / step / save / restore / close) in-process, and the training defects it fixes: resume
refuses any changed setting that changes the weights, weight decay spares LayerNorm and biases, every distinct
warning is shown."""

from dataclasses import replace

import pytest
import torch
from helpers import a_plan, save_model, tiny_model

from slimtune.checkpoint import load_checkpoint
from slimtune.errors import SlimtuneError
from slimtune.optimizers import make_optimizer
from slimtune.pretrained import PerformerLM
from slimtune.train import FitOptions, Trainer, fit


@pytest.fixture
def setup(tmp_path, data_dir):
    model = tiny_model("sqr", True, dtype=torch.float32)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:20000]), dtype=torch.uint8)
    return base, data


def _options(tmp_path, **kw):
    return FitOptions(
        **{
            "seq_len": 32,
            "batch_size": 2,
            "steps": 4,
            "chunk_size": 8,
            "lr": 3e-3,
            "device": "cpu",
            "run_dir": str(tmp_path / "run"),
            "save_every": 0,
        }
        | kw
    )


def test_trainer_interrupted_in_process_resumes_bit_for_bit(tmp_path, setup):
    base, data = setup
    whole = Trainer(PerformerLM.from_pretrained(base), data, _options(tmp_path, run_dir=None), chunk_size=8)
    whole.setup()
    while not whole.done:
        whole.step()
    first = Trainer(PerformerLM.from_pretrained(base), data, _options(tmp_path), chunk_size=8)
    first.setup()
    first.step()
    first.step()
    first.save()  # what an interrupt after two steps does
    first.close()
    second = Trainer(PerformerLM.from_pretrained(base), data, _options(tmp_path, resume=True))
    second.setup()
    assert (second.completed, second.chunk_size) == (2, 8)  # C restored, not planned again
    while not second.done:
        second.step()
    second.close()
    assert second.losses == whole.losses
    for name, t in whole.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], t), name


def test_a_resumed_auto_run_does_not_plan_again(tmp_path, setup, monkeypatch):

    base, data = setup
    first = fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, chunk_size=None, steps=2, mem_budget="2GB"))
    from slimtune import planner

    monkeypatch.setattr(planner, "plan_chunk_size", lambda *a, **k: pytest.fail("planned again on resume"))
    result = fit(
        base,
        data,
        tmp_path / "a.safetensors",
        _options(tmp_path, chunk_size=None, steps=2, mem_budget="2GB", resume=True),
    )
    assert result.plan is not None and result.chunk_size == first.chunk_size  # the first run's choice, kept
    assert result.run == replace(first.run, chunk_source="resumed")  # restored as a unit


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(clip_grad=1.0), "clip_grad"),
        (dict(recovery="store"), "recovery"),
        (dict(skip_nonfinite=True), "skip_nonfinite"),
        (dict(precision="bf16"), "precision"),
        (dict(weight_decay=0.1, optimizer="adamw"), "optimizer"),
        (dict(one_step=True), "one_step"),
    ],
)
def test_resume_refuses_each_setting_that_changes_the_weights(tmp_path, setup, change, name):
    """The message names the Python parameter (the CLI shows it as its flag, tests/test_cli.py)."""
    base, data = setup
    fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=2))
    with pytest.raises(SlimtuneError, match=f"started with `{name}` ") as caught:
        fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=2, resume=True, **change))
    assert name in caught.value.params


def test_weight_decay_spares_layernorm_and_biases():
    model = tiny_model("sqr", True, dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the decay moves anything
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_optimizer("adamw", model, lr=0.1, weight_decay=0.5).step()
    for name, p in model.named_parameters():
        if p.dim() >= 2:  # weight matrices and the embedding: AdamW's decoupled decay p *= 1 - lr * wd
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
        else:  # LayerNorm gains, biases
            assert torch.equal(p, before[name]), name


def test_every_distinct_out_of_memory_fallback_is_reported(tmp_path, setup, monkeypatch):
    from slimtune import train

    base, data = setup
    real = train.slim_step

    def short_of_memory(model, windows, chunk_size, mask=None, **kw):
        if chunk_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, windows, chunk_size, mask, **kw)

    monkeypatch.setattr(train, "slim_step", short_of_memory)
    warnings = []
    result = fit(
        base,
        data,
        tmp_path / "a.safetensors",
        _options(tmp_path, run_dir=None, chunk_size=16, steps=2),
        on_warning=warnings.append,
    )
    assert result.chunk_size == 4
    assert [w.split(";")[0] for w in warnings] == ["out of memory at chunk size 16", "out of memory at chunk size 8"]


def test_a_run_resumed_under_another_thread_count_ends_bit_for_bit(tmp_path, setup):
    """The last bits depend on the thread count (measured: 1 vs 2 threads differ by ~1e-8), so the run state
    records it and a resumed run uses it, whatever this process chose."""
    import torch

    base, data = setup
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = fit(base, data, tmp_path / "whole.safetensors", _options(tmp_path, run_dir=None, threads=2))
        first = Trainer(PerformerLM.from_pretrained(base), data, _options(tmp_path, threads=2), chunk_size=8)
        first.setup()
        first.step()
        first.save()
        first.close()
        warnings = []
        resumed = fit(
            base,
            data,
            tmp_path / "a.safetensors",
            _options(tmp_path, resume=True, threads=1),
            on_warning=warnings.append,
        )
        assert resumed.threads == 2 and any("using 2 CPU threads" in w for w in warnings)
        assert resumed.losses == whole.losses
        a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "whole.safetensors")
        for name, t in b.tensors.items():
            assert torch.equal(a.tensors[name], t), name
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "heap, planner, expected",
    [
        ("managed", {"heap": "fast"}, "fast"),
        ("managed", {"heap": "tight"}, "tight"),
        ("managed", None, "fast"),
        ("system", {"heap": "fast"}, None),
    ],
)
def test_the_steps_run_under_the_run_plans_heap_policy(tmp_path, setup, monkeypatch, heap, planner, expected):
    """A managed heap (fit's default) runs the steps under the plan's policy, "fast" without a plan; heap="system"
    never touches glibc's. The policy is set in one place, around the steps, and restored after them."""
    from slimtune import runplan, train

    base, data = setup
    model = PerformerLM.from_pretrained(base)
    options = _options(tmp_path, run_dir=None, heap=heap)
    run = runplan.plan_for_chunk(model, options, 8, planner=planner and a_plan(**planner))
    assert run.heap == (expected or "")
    entered = []
    real = train.heap_policy_during
    monkeypatch.setattr(train, "heap_policy_during", lambda policy: entered.append(policy) or real(None))
    trainer = Trainer(model, data, options, run=run)
    trainer.setup()
    train._run_steps(trainer, None)
    assert entered == [expected] and trainer.completed == options.steps


# -- the run flow: the run folder's lock first, extending a finished run, the whole call timed -------------------------


def test_a_held_run_folder_is_refused_before_any_planning(tmp_path, setup, monkeypatch):
    """A second run on a folder in use stops at once: before the planner probes anything (a run that finished
    while a second one planned was overwritten by it, with its metrics written twice)."""
    from slimtune import planner
    from slimtune.runs import RunFolder

    base, data = setup
    holder = RunFolder(tmp_path / "run")
    holder.lock()  # another run (flock: a second open of the lock file conflicts even in one process)
    monkeypatch.setattr(planner, "resolve_budget", lambda *a: pytest.fail("planned before taking the lock"))
    try:
        with pytest.raises(SlimtuneError, match="in use"):
            fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, chunk_size=None, mem_budget="2GB"))
    finally:
        holder.release()
    assert not (tmp_path / "a.safetensors").exists()


def test_a_finished_constant_run_extends_bit_for_bit(tmp_path, setup):
    """--resume with more steps after a finished run (constant schedule, warmup done) continues it: 3 then 5 steps
    end where 5 steps in one go end."""
    base, data = setup
    fixed = dict(warmup=2, threads=1)  # the last bits depend on the thread count: one, whatever the load
    whole = fit(base, data, tmp_path / "whole.safetensors", _options(tmp_path, run_dir=None, steps=5, **fixed))
    fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=3, **fixed))
    longer = fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=5, resume=True, **fixed))
    assert longer.first_step == 3 and longer.losses == whole.losses
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "whole.safetensors")
    for name, t in b.tensors.items():
        assert torch.equal(a.tensors[name], t), name


@pytest.mark.parametrize(
    "first, again, reason",
    [
        (dict(schedule="cosine"), dict(schedule="cosine"), "cosine schedule"),
        (dict(warmup=5), dict(warmup=5), "warmup of 5 steps is not done"),
        (dict(), dict(steps=2), "`steps` must be at least 3"),
    ],
)
def test_a_run_is_not_extended_where_its_schedule_forbids(tmp_path, setup, first, again, reason):
    base, data = setup
    fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=3, **first))
    with pytest.raises(SlimtuneError, match=reason) as caught:
        fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, **({"steps": 6} | again), resume=True))
    assert "steps" in caught.value.params


def test_the_result_times_the_whole_call(tmp_path, setup):
    """FitResult.seconds covers loading, planning and the export, as the progress line's elapsed time does (it
    once counted the steps alone: "elapsed 41 s" beside a summary of 10.8 s)."""
    import time

    base, data = setup
    started = time.perf_counter()
    result = fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, run_dir=None, steps=1, threads=None))
    wall = time.perf_counter() - started
    assert 0.9 * wall <= result.seconds <= wall


def test_the_lock_comes_before_the_inputs_are_read(tmp_path, setup):
    """With the folder held by another run, even a missing data file is not looked at: the answer is "in use"."""
    from slimtune.runs import RunFolder

    base, _ = setup
    holder = RunFolder(tmp_path / "run")
    holder.lock()
    try:
        with pytest.raises(SlimtuneError, match="in use"):
            fit(base, tmp_path / "missing.txt", tmp_path / "a.safetensors", _options(tmp_path))
    finally:
        holder.release()


def test_an_adafactor_run_resumes_bit_for_bit(tmp_path, setup):
    """Adafactor's factored state goes into the run state and back: 2 steps, then 2 more, end where 4 do."""
    base, data = setup
    fixed = dict(optimizer="adafactor", threads=1)
    whole = fit(base, data, tmp_path / "whole.safetensors", _options(tmp_path, run_dir=None, **fixed))
    fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=2, **fixed))
    resumed = fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=4, resume=True, **fixed))
    assert resumed.first_step == 2 and resumed.losses == whole.losses and whole.losses[-1] != whole.losses[0]
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "whole.safetensors")
    for name, t in b.tensors.items():
        assert torch.equal(a.tensors[name], t), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_held_out_bpc_is_scored_as_the_steps_compute(tmp_path, setup, precision):
    """The run's evaluation uses its C, batch and compute dtype (bf16 steps: bf16 autocast, whose memory the plan
    holds; an fp32 evaluation beside bf16 steps went over a budget): fit's bpc equals evaluate() called here
    that way, and for bf16 differs from the fp32 score of the same weights."""
    from slimtune.evaluation import evaluate

    base, data = setup
    held_out = data[:4000]
    result = fit(base, data, tmp_path / "t.safetensors", _options(tmp_path, steps=1, precision=precision),
                 eval_data=held_out)  # fmt: skip
    dtype = torch.bfloat16 if precision == "bf16" else None
    kw = dict(seq_len=32, chunk_size=result.chunk_size, batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        expected = evaluate(result.model, held_out, **kw).bpc
    assert result.metrics["bpc"] == pytest.approx(expected, rel=1e-12)
    fp32 = evaluate(result.model, held_out, **kw).bpc
    assert (result.metrics["bpc"] == pytest.approx(fp32, rel=1e-12)) == (precision == "fp32")
