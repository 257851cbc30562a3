"""The Trainer (setup / step / save / restore / close) in-process, and the training defects it fixes: resume
refuses any changed setting that changes the weights, weight decay spares LayerNorm and biases, every distinct
warning is shown."""

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.checkpoint import load_checkpoint
from slimtune.errors import SlimtuneError
from slimtune.model import PerformerLM
from slimtune.optimizers import make_optimizer
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
    from slimtune import train

    base, data = setup
    fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, chunk_size=None, steps=2, mem_budget="2GB"))
    monkeypatch.setattr(train, "plan_chunk_size", lambda *a, **k: pytest.fail("planned again on resume"))
    result = fit(
        base,
        data,
        tmp_path / "a.safetensors",
        _options(tmp_path, chunk_size=None, steps=2, mem_budget="2GB", resume=True),
    )
    assert result.plan is not None and result.chunk_size == result.plan["chunk_size"]


@pytest.mark.parametrize(
    "change, flag",
    [
        (dict(clip_grad=1.0), "--clip-grad"),
        (dict(recovery="store"), "--state-recovery"),
        (dict(skip_nonfinite=True), "--skip-nonfinite"),
        (dict(precision="bf16"), "--precision"),
        (dict(weight_decay=0.1, optimizer="adamw"), "--optimizer"),
        (dict(one_step=True), "--one-step"),
    ],
)
def test_resume_refuses_each_setting_that_changes_the_weights(tmp_path, setup, change, flag):
    base, data = setup
    fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=2))
    with pytest.raises(SlimtuneError, match=f"started with {flag} "):
        fit(base, data, tmp_path / "a.safetensors", _options(tmp_path, steps=2, resume=True, **change))


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
    "plan_heap, budget, expected",
    [("fast", "2GB", "fast"), ("tight", "2GB", "tight"), (None, None, "fast"), (None, "2GB", "tight")],
)
def test_the_run_takes_its_plans_heap_policy_where_the_heap_is_managed(
    tmp_path, setup, monkeypatch, plan_heap, budget, expected
):
    """Under the CLI (a managed heap) a run switches to its plan's heap policy, or without a plan to "tight" under
    a budget and "fast" without one; a library user's process (heap not managed) is never touched."""
    from slimtune import memory, train

    base, data = setup
    chosen = []
    monkeypatch.setattr(train, "set_heap_policy", chosen.append)
    monkeypatch.setattr(memory, "_heap_policy", None)  # an in-process CLI test may have set it
    trainer = Trainer(PerformerLM.from_pretrained(base), data, _options(tmp_path, run_dir=None, mem_budget=budget))
    trainer.plan = None if plan_heap is None else {"chunk_size": 8, "heap": plan_heap}
    trainer.setup()
    assert chosen == []  # not managed: the test process's own heap
    monkeypatch.setattr(memory, "_heap_policy", "tight")
    trainer.setup()
    assert chosen == [expected]
