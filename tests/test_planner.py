"""Budgets, the planner's rounding rule and prediction, device mapping (NVML mocked), and the out-of-memory
fallback (injected)."""

import dataclasses
import sys
import types

import pytest
import torch
from helpers import assert_close, save_model, tiny_model
from hypothesis import given
from hypothesis import strategies as st

from slimtune import devices, train
from slimtune.breakdown import StepBreakdown
from slimtune.checkpoint import load_checkpoint
from slimtune.choices import ChunkRule
from slimtune.devices import resolve_budget
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.planner import (
    HEADROOM,
    Probe,
    Workload,
    _monotone,
    _tracked_step,
    choose_chunk,
    chunk_sizes,
    full_seconds,
    plan_chunk_size,
    predict,
    probe,
    probe_windows,
    relative_time,
)
from slimtune.units import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 10**9),
        ("1.5GiB", int(1.5 * 2**30)),
        ("512MB", 512 * 10**6),
        ("900000000", 900000000),
        ("64 MiB", 64 * 2**20),
        ("3kb", 3000),
        (" 1e9 ", 10**9),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-2GB", "0", "0.1", "2 gigabytes", "nan", "inf", "1..5GB", "2XB", "1e999"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


@given(st.text(max_size=20))
def test_parse_size_fuzz_never_crashes(text):
    try:
        assert parse_size(text) >= 1
    except ConfigError:
        pass


@given(st.integers(min_value=1, max_value=10**15))
def test_parse_size_integers_round_trip(n):
    assert parse_size(str(n)) == n


def test_budget_percent_and_cap():
    cpu = torch.device("cpu")
    budget, available = resolve_budget("50%", cpu)
    assert abs(budget - available / 2) <= available * 0.02  # available drifts a little between the two reads
    capped, available = resolve_budget(10**18, cpu)
    assert capped <= available * 1.02
    for bad in ("0%", "150%", "x%"):
        with pytest.raises(ConfigError):
            resolve_budget(bad, cpu)


def test_chunk_sizes_rule():
    sizes = chunk_sizes(16384)
    assert sizes[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]
    for c in sizes[7:]:
        assert c % 64 == 0 and bin(c).rstrip("0").count("1") + bin(c).rstrip("0").count("0") - 1 <= 3
    assert max(sizes) < 16384 and 14336 in sizes


def test_choose_chunk_takes_the_fastest_or_the_largest_that_fits():
    fitting = [64, 128, 256, 512, 1024]
    seconds = {64: 3.0, 128: 1.5, 256: 1.0, 512: 1.09, 1024: 2.2}.get
    chosen, why = choose_chunk(fitting, seconds, ChunkRule.FASTEST, time_known=True)
    assert chosen == 512  # 256 is the fastest, 512 lies within CHOICE_TIE of it: the larger of the two
    assert "1024" in why and "2.02x" in why  # the largest that fits, at 2.2 / 1.09 the time
    assert choose_chunk(fitting, seconds, ChunkRule.LARGEST, time_known=True)[0] == 1024
    assert choose_chunk(fitting, seconds, ChunkRule.FASTEST, time_known=False)[0] == 1024  # no timing: the paper's
    assert choose_chunk(fitting, lambda c: 1.0, ChunkRule.FASTEST, time_known=True) == (
        1024,
        "the fastest that fits, and the largest",
    )
    assert choose_chunk([], seconds, ChunkRule.FASTEST, time_known=True)[0] is None


def test_predicted_peaks_never_fall_as_c_grows_under_one_heap_policy():
    """A 3 MB block at C = 1024 sits in the fragmenting heap (2.5x) up to C = 1365 and is mmap'ed (1.15x) above
    the tight policy's 4 MB threshold: the raw prediction falls there; the plan's does not (below L; full backprop
    keeps its own one-pass prediction)."""
    mb = 2**20
    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=32, ffn_dim=64, n_heads=2)
    p = Probe(
        base=0, per_token=3 * mb / 1024, optimizer_state=0, optimizer_peak=0, heap_overhead=2.5,
        mapped_overhead=1.15, probe_tokens=1024, sizes=[3 * mb],
    )  # fmt: skip
    work = Workload(4096, 1, "sgd")

    def raw(c, batching, heap):
        return predict(model, p, 100 * mb, work, c, batching=batching, heap=heap)

    grid = [c for c in chunk_sizes(4096) if c >= 256]  # below L
    assert raw(1280, False, "tight").total > raw(1536, False, "tight").total  # the case is real
    for heap in ("tight", "fast"):
        peaks = [_monotone(raw, c, 4096, False, heap) for c in grid]
        assert [lines.total for lines in peaks] == sorted(lines.total for lines in peaks)
        for lines in peaks:  # the lines still add up
            shown = lines.to_json()
            assert sum(v for k, v in shown.items() if k != "total") == shown["total"] == lines.total
        assert _monotone(raw, 1536, 4096, False, heap).total >= raw(1280, False, heap).total


def tight_probe(model):
    return probe(model, Workload(4096, 1, "adam"))


def test_prediction_grows_and_the_choice_fits():
    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    loose = plan_chunk_size(model, Workload(4096, 1, "adam"), "95%")
    peaks = [c.predicted_peak_bytes for c in loose.candidates]
    assert peaks == sorted(peaks)
    by_size = {c.chunk_size: c.predicted_peak_bytes for c in loose.candidates}
    # A wide gap: the runtime (RSS) is measured again by the second plan, and other tests move it by megabytes.
    tight = plan_chunk_size(model, Workload(4096, 1, "adam"), (by_size[256] + by_size[4096]) // 2)
    usable = tight.budget_bytes * (1 - HEADROOM)
    assert 64 <= tight.chunk_size < 4096
    # The probe's line through two measured steps, checked against a third step at the chosen C, counted apart.
    probe_ = tight_probe(model)
    held = _tracked_step(model, probe_windows(model, 1, tight.chunk_size), "fp32").peak
    assert abs(probe_.base + probe_.per_token * tight.chunk_size - held) <= 0.15 * held
    larger = [c for c in chunk_sizes(4096) + [4096] if c > tight.chunk_size][0]
    assert predict(model, tight_probe(model), tight.breakdown.runtime, Workload(4096), larger).total > usable * 0.98
    with pytest.raises(SlimtuneError, match="cannot fit even C = 1.*optimizer=sgd"):
        plan_chunk_size(model, Workload(4096, 1, "adam"), 10**6)


def test_gpus_are_matched_by_uuid_and_mig_uses_its_own_memory(monkeypatch):
    """CUDA index 0 is NVML card 2 (CUDA_VISIBLE_DEVICES=2,...); CUDA index 1 is a MIG slice NVML does not list."""
    cards = {"GPU-aaaa": ("A100", 80e9, 70e9), "GPU-bbbb": ("A100", 80e9, 60e9), "GPU-cccc": ("H100", 80e9, 50e9)}
    order = list(cards)

    class Mem:
        def __init__(self, total, free):
            self.total, self.free = total, free

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: len(order),
        nvmlDeviceGetHandleByIndex=lambda i: order[i],
        nvmlDeviceGetName=lambda h: cards[h][0].encode(),
        nvmlDeviceGetUUID=lambda h: h,
        nvmlDeviceGetMemoryInfo=lambda h: Mem(cards[h][1], cards[h][2]),
    )
    props = [
        types.SimpleNamespace(name="NVIDIA H100", uuid="cccc"),
        types.SimpleNamespace(name="NVIDIA A100 MIG 1g.10gb", uuid="MIG-dddd"),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (4e9, 10e9))
    gpus, note = devices.detect_gpus()
    assert note is None
    assert (gpus[0].index, gpus[0].name, gpus[0].free_bytes, gpus[0].mig) == (0, "H100", 50e9, False)
    assert (gpus[1].index, gpus[1].total_bytes, gpus[1].free_bytes, gpus[1].mig) == (1, 10e9, 4e9, True)


def test_out_of_memory_retries_the_step_with_a_smaller_chunk(monkeypatch, tmp_path, data_dir):
    model = tiny_model("sqr", True, dtype=torch.float32)
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    real_step = train.slim_step
    calls = []

    def flaky(model, windows, chunk_size, mask=None, **kw):
        calls.append(chunk_size)
        if chunk_size > 100:
            real_step(model, windows, 7, **kw)  # leave partial gradients behind, as a real failure would
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(model, windows, chunk_size, mask, **kw)

    monkeypatch.setattr(train, "slim_step", flaky)
    warnings = []
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:20000]), dtype=torch.uint8)
    options = train.FitOptions(seq_len=300, steps=3, chunk_size=300, optimizer="sgd", lr=0.1, device="cpu")
    result = train.fit(load_checkpoint(base), data, tmp_path / "a.safetensors", options, on_warning=warnings.append)
    assert result.chunk_size == 64 and calls[:5] == [300, 256, 192, 128, 64] and len(warnings) == 4  # one per fallback
    monkeypatch.setattr(train, "slim_step", real_step)
    options = dataclasses.replace(options, chunk_size=300)
    plain = train.fit(load_checkpoint(base), data, tmp_path / "b.safetensors", options)
    for name, t in load_checkpoint(tmp_path / "b.safetensors").tensors.items():
        assert_close(load_checkpoint(tmp_path / "a.safetensors").tensors[name], t, 1e-5, name)
    assert plain.losses == pytest.approx(result.losses, rel=1e-5)


def test_weight_gradient_buffers_are_counted_and_used_only_when_they_fit(monkeypatch):
    """The planner's line for the batching buffers equals what a real batched step allocates (measured from the
    batcher's buffers), and the buffers are left out when one chunk has nothing to batch."""
    from slimtune import deferred
    from slimtune.slim import slim_step

    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    allocated = []
    real_exit = deferred.WeightGradBatcher.__exit__

    def measure(self, *exc):
        buffers = [t for slot in self.slots.values() for t in (slot.x, slot.g) if t is not None]
        allocated.append(sum(t.untyped_storage().nbytes() for t in buffers))
        return real_exit(self, *exc)

    monkeypatch.setattr(deferred.WeightGradBatcher, "__exit__", measure)
    slim_step(model, torch.randint(0, 256, (1, 4097)), 32, batch_weight_grads=True)
    model.zero_grad(set_to_none=True)
    probe_ = tight_probe(model)
    plain = predict(model, probe_, 0, Workload(4096), 32)
    batched = predict(model, probe_, 0, Workload(4096), 32, batching=True)
    assert allocated and allocated[0] > 0
    assert batched.gradient_batching == allocated[0] and batched.total - plain.total == allocated[0]
    loose = plan_chunk_size(model, Workload(4096, 1, "sgd"), "95%")
    assert loose.chunk_size == 4096 and not loose.batch_weight_grads  # one chunk: nothing to batch
    # Asked for at a small given C: counted in the plan's peak, and refused when it does not fit.
    asked = plan_chunk_size(model, Workload(4096, 1, "sgd", batch_weight_grads=True), "95%", forced=32)
    assert asked.batch_weight_grads and asked.breakdown.gradient_batching == allocated[0]
    refused = plan_chunk_size(model, Workload(4096, 1, "sgd", batch_weight_grads=False), "95%", forced=32)
    assert not refused.batch_weight_grads and refused.breakdown.gradient_batching == 0


@pytest.mark.parametrize("optimizer, state_copies", [("sgd", 0), ("adam", 2)])
def test_probe_room_on_cuda_is_the_cards_own_room(monkeypatch, optimizer, state_copies):
    """On CUDA the probe's room is the budget less the context, the allocated weights, the gradients and the
    optimizer state: host RSS (huge here) plays no part. The card's queries are faked, so CI checks the sums."""
    from slimtune import planner

    GB = 10**9
    model = tiny_model("sqr", True, dtype=torch.float32)
    param_bytes = 4 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * GB, 8 * GB))  # 3 GB used on the card
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GB)  # of which the allocator: 2 GB
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: GB // 2)  # the weights
    monkeypatch.setattr(devices, "nvml_other_processes_bytes", lambda device: GB // 4)  # another process's share
    monkeypatch.setattr(planner, "process_rss", lambda: 100 * GB)
    state = planner.measure_optimizer(model, optimizer)[0]
    assert state == state_copies * param_bytes  # measured: adam keeps two parameter-sized moments, sgd none
    room = planner.probe_room(model, state, 6 * GB, torch.device("cuda", 0))
    context = 8 * GB - 5 * GB - 2 * GB - GB // 4  # used on the card, less the allocator's and the other process's
    assert room == 6 * GB - context - GB // 2 - param_bytes - state_copies * param_bytes
    # On CPU the process's RSS is what the job already holds.
    cpu_room = planner.probe_room(model, state, 6 * GB, torch.device("cpu"))
    assert cpu_room == 6 * GB - 100 * GB - param_bytes - state_copies * param_bytes


@pytest.mark.parametrize("optimizer_state, enough", [(3_300_000, False), (50_000_000, True)])
def test_nothing_fits_names_the_gap_and_only_what_could_close_it(optimizer_state, enough):
    """10 MB missing: saving 3.3 MB with sgd is mentioned but called not enough; saving 50 MB is not."""
    from slimtune.planner import Probe, _nothing_fits

    budget = 400_000_000
    usable = budget * (1 - HEADROOM)
    fixed = 350_000_000 + optimizer_state + 1_000_000
    lines = StepBreakdown(  # the lines add up to 10 MB over
        runtime=350_000_000, optimizer=optimizer_state, gradients=1_000_000, chunk=int(usable + 10_000_000) - fixed
    )
    probe_ = Probe(0, 0, optimizer_state, optimizer_state)
    message = str(_nothing_fits(lines, probe_, Workload(4096, 1), budget, 2 * budget))
    assert "10.00 MB over" in message and "optimizer=sgd" in message
    assert ("not enough on its own" in message) is (not enough)
    assert f"at least {lines.total / (1 - HEADROOM) / 1e6:.2f} MB" in message
    assert "batch_size" not in message  # batch 1: nothing to make smaller
    assert "batch_size" in str(_nothing_fits(lines, probe_, Workload(4096, 2), budget, 2 * budget))


def test_the_out_of_budget_message_adds_up():
    """Every term of the predicted peak is named, and the named terms sum to the total the message states."""
    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    with pytest.raises(SlimtuneError) as caught:
        plan_chunk_size(model, Workload(65536, 2, "adam"), 10**6)
    message = str(caught.value)
    terms, total = message.split(": ", 1)[1].split(",")[0].split(" = ")
    sizes = [parse_size(term.rsplit(" ", 2)[-2] + term.rsplit(" ", 1)[-1]) for term in terms.split(" + ")]
    assert "states" in terms  # 2 x 64k windows and the attention states: not hidden
    assert sum(sizes) == pytest.approx(parse_size(total.replace(" ", "")), rel=1e-3)


def test_the_fast_heap_is_planned_only_where_its_peak_fits(monkeypatch):
    """Where the heap is managed (fit's default), C is chosen under the "tight" heap (the least resident memory);
    the run gets the "fast" heap (no page faults) only when its peak under "fast", heap-sized blocks at
    HEAP_OVERHEAD, fits the budget too. With glibc's own heap ("system") C is chosen under "fast" and the plan
    names no policy (the run leaves the heap alone)."""
    from slimtune import planner

    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    loose = plan_chunk_size(model, Workload(4096, 1, "adam"), "95%", heap="managed")
    assert loose.chunk_size == 4096 and loose.heap == "fast"
    probe_ = tight_probe(model)
    runtime = loose.breakdown.runtime
    tight_peak = predict(model, probe_, runtime, Workload(4096), 4096, heap="tight").total
    fast_peak = predict(model, probe_, runtime, Workload(4096), 4096, heap="fast").total
    assert fast_peak > tight_peak + 8 * 2**20  # [4096, 256] fp32 blocks: mmap'ed under tight, heap under fast
    budget = int((tight_peak + fast_peak) / 2 / (1 - HEADROOM))
    monkeypatch.setattr(planner, "_runtime_bytes", lambda model, data=0: runtime)  # RSS drifts by MB between plans
    unmanaged = plan_chunk_size(model, Workload(4096, 1, "adam"), budget, heap="system")
    assert unmanaged.chunk_size < 4096 and unmanaged.heap == ""
    between = plan_chunk_size(model, Workload(4096, 1, "adam"), budget, heap="managed", rule="max")
    assert between.chunk_size == 4096 and between.heap == "tight"
    assert between.predicted_peak_bytes < fast_peak


def test_time_model_adds_the_page_faults_of_the_heap_policy():
    """The time column, from a probe with known numbers: chunks' overhead and tokens' work, plus page faults for
    the blocks each heap policy maps afresh (4 MB and up under tight, 32 MB and up under fast), over full
    backprop with the heap it would run with."""
    mb = 2**20
    p = Probe(
        base=0, per_token=0, optimizer_state=0, optimizer_peak=0, full_per_token=1e-5, slim_base=1e-3,
        slim_per_token=2e-5, fault_per_byte=1e-9, probe_tokens=1024, sizes=[8 * mb, mb],
    )  # fmt: skip
    L = 8192
    full = 1e-5 * L  # at L the 8 MB block is 64 MB (mapped under both), the 1 MB block 8 MB (mapped under tight)
    assert full_seconds(p, L, "fast") == pytest.approx(full + 64 * mb * 1e-9)
    assert full_seconds(p, L, "tight") == pytest.approx(full + 72 * mb * 1e-9)
    unit = full + 64 * mb * 1e-9
    assert relative_time(p, L, L, "fast") == relative_time(p, L, L, "tight", "tight") == 1.0  # the unit itself
    tight_unit = full + 72 * mb * 1e-9  # full backprop that runs with the tight heap is the unit of its own plan
    assert relative_time(p, L, 1024, "tight", "tight") == pytest.approx((8e-3 + 2e-5 * L + 64 * mb * 1e-9) / tight_unit)
    work = 8 * 1e-3 + 2e-5 * L  # C = 1024: 8 chunks
    assert relative_time(p, L, 1024, "fast") == pytest.approx(work / unit)
    assert relative_time(p, L, 1024, "tight") == pytest.approx((work + 8 * 8 * mb * 1e-9) / unit)
    assert relative_time(p, L, 256, "tight") == pytest.approx((32 * 1e-3 + 2e-5 * L) / unit)  # 2 MB: heap


def test_the_plan_counts_the_copies_a_run_holds(monkeypatch, data_dir):
    """What a run holds besides weights, gradients, state and a chunk is charged: the one-step adaptation's copy
    of the weights (it restores them for each window) and torchrun's flat all-reduce buffer of the gradients."""
    from slimtune import evaluation, runplan
    from slimtune.distributed import Group
    from slimtune.options import FitOptions

    model = tiny_model("sqr", True, dtype=torch.float32)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    seen = []

    def recording(model_, work, budget, **kw):
        seen.append(work)
        return plan_chunk_size(model_, work, budget, **kw)

    from slimtune import planner

    monkeypatch.setattr(planner, "plan_chunk_size", recording)
    data = torch.tensor(list((data_dir / "ptb.test.txt").read_bytes()[:4000]), dtype=torch.uint8)
    evaluation.adapt_one_step(model, data, seq_len=64, windows=1, mem_budget="2GB")
    assert seen[0].copies_bytes == weights
    monkeypatch.setattr(runplan, "agree_min", lambda c, device: c)  # no process group in this test
    runplan.resolve_run(model, FitOptions(seq_len=64, mem_budget="2GB", device="cpu"), Group(rank=0, world=2))
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    assert seen[1].copies_bytes == grads
    probe_ = tight_probe(model)
    lines = [predict(model, probe_, 0, Workload(64, copies_bytes=n), 16) for n in (0, grads)]
    assert lines[1].copies == grads and lines[1].total - lines[0].total == grads


def test_a_partly_frozen_model_plans_and_is_charged_gradients_only_for_what_trains():
    """Frozen parameters hold no gradient and no optimizer state: the plan counts the trainable ones only (counted
    here from the model), and its probes run at every C although the lower layers need no gradient."""
    import slimtune

    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=4)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("layers.1.", "output")))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = slimtune.plan(model, seq_len=4096, mem_budget="95%", optimizer="adam")
    assert plan.breakdown.gradients == 4 * trainable and plan.breakdown.optimizer == 8 * trainable
    assert all(p.grad is None for p in model.parameters())  # the probes leave no gradients behind


def test_the_export_line_counts_a_merged_adapter_where_it_exceeds_the_freed_chunk():
    from slimtune import lora

    model = tiny_model(dtype=torch.float32, hidden_dim=256, ffn_dim=4096, n_heads=4)  # U_map, V_map: 4 MB each
    lora.add(model, rank=2)
    probe_ = tight_probe(model)
    export = model.export_bytes("auto")  # the export merges one weight at a time
    without = predict(model, probe_, 0, Workload(4096), 1)
    with_export = predict(model, probe_, 0, Workload(4096), 1, export=export)
    assert without.export == 0 and with_export.export > 0  # C = 1: one merged weight outweighs a chunk
    assert with_export.total - without.total == with_export.export <= export
    at_full = predict(model, probe_, 0, Workload(4096), 4096, export=export)
    assert at_full.export == 0  # full backprop's activations, freed, leave room for the copies
