"""Scoring (slimtune/evaluation.py): evaluate's bits per character equal the mean next-byte cross-entropy / ln 2
computed by hand from the full forward pass over the same sequences (the last, shorter one included), at 1024 bytes
a sequence by default whatever L the checkpoint was trained at; the one-step adaptation protocol against the same
steps written out with plain autograd, and with SLiM at any C against full backprop; the copy task's accuracy by
hand; and bad arguments named. Under a memory budget (eval_plan.py): the same bpc at every C the plan chooses, a
smaller C for a smaller budget or a larger vocabulary, an impossible budget refused (exit 2 on the command line),
and a fresh eval process whose peak resident memory stays within its budget."""

import json
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune import eval_plan, evaluation
from slimtune.checkpoint import save_checkpoint
from slimtune.data import copy_windows
from slimtune.errors import ConfigError, DataError, OutOfBudgetError
from slimtune.evaluation import DEFAULT_SEQ_LEN, adapt_one_step, copy_accuracy, evaluate
from slimtune.planner import HEADROOM
from slimtune.pretrained import PerformerLM


@pytest.fixture(scope="module")
def text(data_dir):
    raw = (data_dir / "ptb.valid.txt").read_bytes()[:50_000]
    return torch.tensor(list(raw), dtype=torch.uint8)


def _nll_sum(model, seq: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(next byte) over one sequence, by the full forward pass from position 0 (float64)."""
    ids = seq.long()[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).sum().item(), ids.shape[1] - 1


def _bpc_by_hand(model, data: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Consecutive sequences starting at 0, L, 2L, ... each predicting up to L next bytes, the last one shorter."""
    total, count = 0.0, 0
    for start in range(0, data.numel() - 1, seq_len):
        nll, n = _nll_sum(model, data[start : start + seq_len + 1])
        total, count = total + nll, count + n
    return total / count / math.log(2), count


@pytest.mark.parametrize(
    "n, seq_len, chunk_size, batch_size",
    [(3000, None, 100, 2), (1050, 100, 7, 3), (1001, 100, 1000, 8), (2, 5, 1, 1)],
)
def test_bpc_is_the_mean_cross_entropy_over_ln_2(text, n, seq_len, chunk_size, batch_size):
    model = tiny_model("elu+1", True, dtype=torch.float64, seed=1)
    result = evaluate(model, text, seq_len=seq_len, chunk_size=chunk_size, batch_size=batch_size, max_bytes=n)
    bpc, count = _bpc_by_hand(model, text[:n], seq_len or 1024)
    assert result.predicted_bytes == count == n - 1
    assert result.seq_len == (seq_len or 1024) and result.chunk_size == chunk_size
    assert abs(result.bpc - bpc) <= 1e-6 * bpc  # evaluate's cross-entropy is taken in float32
    assert abs(result.loss - bpc * math.log(2)) <= 1e-6 * result.loss


def test_without_seq_len_every_checkpoint_is_scored_at_1024(tmp_path, text):
    assert DEFAULT_SEQ_LEN == 1024
    model = tiny_model("sqr", True, dtype=torch.float32, seed=2)
    path = tmp_path / "m.safetensors"
    save_checkpoint(
        path, {k: v.contiguous() for k, v in model.state_dict().items()}, model.config, extra_config={"seq_len": 64}
    )
    loaded = PerformerLM.from_pretrained(path, dtype=torch.float64)
    assert loaded.source.extra_config["seq_len"] == 64
    result = evaluate(loaded, text, max_bytes=4000)
    assert result.seq_len == 1024
    bpc_1024, _ = _bpc_by_hand(loaded, text[:4000], 1024)
    bpc_64, _ = _bpc_by_hand(loaded, text[:4000], 64)
    assert abs(bpc_1024 - bpc_64) > 1e-4  # the two lengths score differently, so the check below can tell them apart
    assert abs(result.bpc - bpc_1024) <= 1e-6 * bpc_1024


def test_a_path_is_read_as_bytes(tmp_path, text):
    model = tiny_model(dtype=torch.float64, seed=3)
    (tmp_path / "v.txt").write_bytes(bytes(text[:900].tolist()))
    from_file = evaluate(model, tmp_path / "v.txt", seq_len=200)
    bpc, count = _bpc_by_hand(model, text[:900], 200)
    assert from_file.predicted_bytes == count and abs(from_file.bpc - bpc) <= 1e-6 * bpc


def test_a_favor_model_without_a_draw_gets_the_seeded_one(tmp_path, text):
    path = save_model(tmp_path / "f.safetensors", tiny_model("favor+", True, dtype=torch.float32, seed=4))
    first = evaluate(PerformerLM.from_pretrained(path, dtype=torch.float64), text, seq_len=128, max_bytes=600)
    again = evaluate(PerformerLM.from_pretrained(path, dtype=torch.float64), text, seq_len=128, max_bytes=600)
    other = evaluate(
        PerformerLM.from_pretrained(path, dtype=torch.float64), text, seq_len=128, max_bytes=600, feature_seed=1
    )
    assert first.bpc == again.bpc and first.bpc != other.bpc
    by_hand = PerformerLM.from_pretrained(path, dtype=torch.float64)
    by_hand.redraw_features(torch.Generator().manual_seed(0))  # feature_seed 0, the default
    bpc, _ = _bpc_by_hand(by_hand, text[:600], 128)
    assert abs(first.bpc - bpc) <= 1e-6 * bpc


def test_bad_arguments_are_named(text):
    model = tiny_model(dtype=torch.float32)
    for bad in (dict(seq_len=-1), dict(chunk_size=0)):
        with pytest.raises(ConfigError, match="must be >= 1") as info:
            evaluate(model, text, **bad)
        assert info.value.params == ("seq_len", "chunk_size")
    with pytest.raises(ConfigError, match="at least 2 bytes") as info:
        evaluate(model, text, max_bytes=1)
    assert info.value.params == ("max_bytes",)


def test_seq_len_zero_is_refused_not_replaced_by_the_default(text):
    with pytest.raises(ConfigError, match="must be >= 1"):
        evaluate(tiny_model(dtype=torch.float32), text, seq_len=0, max_bytes=3000)


# ---------------------------------------------------------------- one-step adaptation


def test_one_step_adaptation_by_hand(text):
    """With exactly L + 1 bytes the one window is the whole data. By hand: the second half's bpc, one plain-SGD
    step on the first half's mean loss (plain autograd, full forward), the second half's bpc again."""
    L, lr = 64, 0.5
    data = text[: L + 1]
    model = tiny_model("sqr", True, dtype=torch.float64, seed=5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt_one_step(model, data, seq_len=L, windows=1, lr=lr, chunk_size=8)
    for name, t in model.state_dict().items():  # the model is left with its original weights
        assert torch.equal(t, original[name]), name

    ids = data.long()[None]
    half = L // 2

    def second_half_bpc(m):
        with torch.no_grad():
            logp = torch.log_softmax(m(ids[:, :-1]), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return -logp[:, half:].mean().item() / math.log(2)

    by_hand = tiny_model("sqr", True, dtype=torch.float64, seed=5)
    before = second_half_bpc(by_hand)
    loss = torch.nn.functional.cross_entropy(by_hand(ids[:, :half])[0], ids[0, 1 : half + 1])
    loss.backward()
    with torch.no_grad():
        for p in by_hand.parameters():
            p -= lr * p.grad
    after = second_half_bpc(by_hand)
    assert abs(result.bpc_before - before) <= 1e-6 * before
    assert abs(result.bpc_after - after) <= 1e-6 * after
    assert abs(result.difference - (after - before)) <= 1e-6 * before
    assert after != before and (result.windows, result.seq_len, result.chunk_size, result.lr) == (1, L, 8, lr)


def test_adaptation_at_full_and_at_a_small_chunk_agree(text):
    model = tiny_model("elu+1", False, dtype=torch.float32, seed=6)
    full = adapt_one_step(model, text, seq_len=96, windows=3, lr=0.3, chunk_size="full", seed=2)
    small = adapt_one_step(model, text, seq_len=96, windows=3, lr=0.3, chunk_size=5, seed=2)
    assert full.chunk_size == 48 and small.chunk_size == 5  # "full" is the first half's length
    assert abs(small.bpc_before - full.bpc_before) <= 1e-5 * full.bpc_before
    assert abs(small.bpc_after - full.bpc_after) <= 1e-5 * full.bpc_after
    assert abs(full.bpc_after - full.bpc_before) > 1e-3  # the step did something


def test_adaptation_with_slim_equals_full_backprop(data_dir):  # moved from test_workflow.py
    model = tiny_model("sqr", True, dtype=torch.float32)
    data = torch.tensor(list((data_dir / "ptb.valid.txt").read_bytes()[:50000]), dtype=torch.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = adapt_one_step(model, data, seq_len=128, windows=3, lr=0.5, chunk_size=7, seed=1)
    full = adapt_one_step(model, data, seq_len=128, windows=3, lr=0.5, chunk_size=128, seed=1)
    assert abs(slim.bpc_before - full.bpc_before) < 1e-5 * full.bpc_before
    assert abs(slim.bpc_after - full.bpc_after) < 1e-5 * full.bpc_after
    assert slim.bpc_after != slim.bpc_before  # the step did something
    for name, t in model.state_dict().items():  # each window starts again from the original weights
        assert torch.equal(t, before[name])


def test_adaptation_needs_a_window(text):
    model = tiny_model(dtype=torch.float32)
    for seq_len, data in ((3, text), (64, text[:64])):
        with pytest.raises(ConfigError, match="one-step adaptation needs") as info:
            adapt_one_step(model, data, seq_len=seq_len, chunk_size=4)
        assert info.value.params == ("seq_len",)


# ---------------------------------------------------------------- the copy task


def test_copy_accuracy_by_hand():
    model = tiny_model("sqr", True, dtype=torch.float64, seed=7)
    accuracy = copy_accuracy(model, 24, 6, torch.Generator().manual_seed(3), batches=2)
    generator, hits, total = torch.Generator().manual_seed(3), 0, 0
    with torch.no_grad():
        for _ in range(2):  # the same draws: 8 sequences a batch
            windows, mask = copy_windows(8, 24, 6, generator)
            right = model(windows[:, :-1]).argmax(-1) == windows[:, 1:]
            hits += int(right[mask.bool()].sum())
            total += int(mask.sum())
    assert total == 2 * 8 * 12 and accuracy == hits / total


def test_a_given_adaptation_chunk_is_checked_against_a_budget(text):
    """As in fit: a given C is checked against a given budget (and refused when it cannot fit), not taken blindly."""
    from slimtune.errors import OutOfBudgetError

    with pytest.raises(OutOfBudgetError, match="cannot fit even C = 1|chunk size 8 is predicted"):
        adapt_one_step(tiny_model(dtype=torch.float32), text, seq_len=64, windows=1, chunk_size=8, mem_budget="1KB")


# ---------------------------------------------------------------- under a memory budget

RUNTIME = 100_000_000  # what the process holds as the plan sees it (the `runtime` fixture)


@pytest.fixture
def runtime(monkeypatch):
    """The process as the plan measures it, fixed: it holds RUNTIME bytes and the probes' own peak is not read, so
    that a budget picks the same C on any machine (the probes' tensor bytes are counted, deterministic)."""
    monkeypatch.setattr(eval_plan, "held_bytes", lambda device: RUNTIME)
    monkeypatch.setattr(eval_plan, "new_peak_window", lambda: False)
    return RUNTIME


def _budget(extra: float) -> int:
    """A budget whose usable share (less the headroom) leaves `extra` bytes beside the runtime."""
    return int((RUNTIME + extra) / (1 - HEADROOM))


def test_planned_eval_scores_as_the_full_forward_at_every_chosen_c(text, runtime):
    model = tiny_model("elu+1", True, dtype=torch.float64, seed=8)
    n, L = 3000, 512
    expected, count = _bpc_by_hand(model, text[:n], L)
    chosen = []
    for extra in (50e3, 200e3, 1e6, 10e6, 50e6):
        result = evaluate(model, text, seq_len=L, max_bytes=n, mem_budget=_budget(extra))
        assert result.predicted_bytes == count and abs(result.bpc - expected) <= 1e-6 * expected
        assert result.budget_bytes == _budget(extra) and result.predicted_peak_bytes <= result.budget_bytes
        assert result.plan.breakdown.data == n  # the data, read whole, is counted
        chosen.append((result.chunk_size, result.batch_size))
    assert chosen == sorted(chosen), chosen  # a smaller budget never a larger C, nor at C = L a larger batch
    sizes = {c for c, _ in chosen}
    assert len(sizes) >= 3 and min(sizes) < 64 and chosen[-1] == (L, n // (L + 1)), chosen


def test_a_large_vocabulary_gets_a_smaller_c_and_scores_tokens_as_the_full_forward(runtime):
    """Token ids of a 32000-token model: its logits [B, C, V] count, so the same room fits a smaller C than a byte
    model's, and bits per token are those of the full forward pass."""
    ids = torch.randint(0, 32000, (600,), generator=torch.Generator().manual_seed(0))
    big = tiny_model("sqr", True, dtype=torch.float32, seed=9, vocab_size=32000)
    small = tiny_model("sqr", True, dtype=torch.float32, seed=9)
    result = evaluate(big, ids, seq_len=256, mem_budget=_budget(10e6))
    byte_level = evaluate(small, ids % 256, seq_len=256, mem_budget=_budget(10e6))
    assert result.chunk_size < byte_level.chunk_size and result.chunk_size < 256
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, 256):
            seq = ids[start : start + 257][None]
            logp = torch.log_softmax(big(seq[:, :-1]).double(), dim=-1)
            total -= logp.gather(-1, seq[:, 1:, None]).sum().item()
            count += seq.shape[1] - 1
    assert result.predicted_bytes == count
    assert abs(result.bpc - total / count / math.log(2)) <= 1e-5 * result.bpc


def test_a_given_chunk_is_taken_without_a_budget_and_checked_against_one(text, runtime):
    model = tiny_model(dtype=torch.float32, seed=10)
    alone = evaluate(model, text, seq_len=512, max_bytes=3000, chunk_size=512, batch_size=2)
    assert (alone.chunk_size, alone.batch_size, alone.budget_bytes) == (512, 2, None)
    checked = evaluate(model, text, seq_len=512, max_bytes=3000, chunk_size=512, mem_budget=_budget(50e6))
    assert checked.chunk_size == 512 and checked.bpc == pytest.approx(alone.bpc, rel=1e-6)
    with pytest.raises(OutOfBudgetError, match="chunk size 512 with 1 sequence.* the largest C that fits is") as info:
        evaluate(model, text, seq_len=512, max_bytes=3000, chunk_size="full", mem_budget=_budget(200e3))
    assert "mem_budget" in info.value.params


def test_an_impossible_budget_is_refused_naming_what_is_missing(text):
    with pytest.raises(OutOfBudgetError, match="cannot fit even C = 1") as info:
        evaluate(tiny_model(dtype=torch.float32), text, max_bytes=3000, mem_budget="1MB")
    assert "runtime" in str(info.value) and "`mem_budget`" in str(info.value) and "mem_budget" in info.value.params


def test_ids_beyond_the_vocabulary_are_refused():
    model = tiny_model(dtype=torch.float32, vocab_size=300)
    with pytest.raises(DataError, match="token id 300 at position 2, outside the model's vocabulary of 300"):
        evaluate(model, torch.tensor([0, 5, 300, 2]), seq_len=4, chunk_size=2)


def test_adaptation_counts_the_data_it_holds(text, monkeypatch):
    """--adapt plans its SLiM step with the data (read whole) in the workload, and reports the plan and the peak."""
    seen = []
    real = evaluation.plan_if_needed
    monkeypatch.setattr(evaluation, "plan_if_needed", lambda *a, **kw: seen.append((a[1], kw)) or real(*a, **kw))
    result = adapt_one_step(tiny_model(dtype=torch.float32), text, seq_len=64, windows=1, mem_budget="4GB")
    work, kw = seen[0]
    assert work.data_bytes == text.numel() and kw["resident_data"] == text.numel()
    assert result.budget_bytes is not None and result.predicted_peak_bytes <= result.budget_bytes
    assert result.peak_memory_bytes > 0


def _slimtune(*args) -> tuple[int, str, str, int]:
    """`python -m slimtune ARGS` in a fresh process: (exit code, stdout, stderr, its peak resident memory in bytes:
    this child's own ru_maxrss, from os.wait4, not the running maximum over every child of the test process)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-m", "slimtune", *map(str, args)], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        out.seek(0), err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), err.read(), usage.ru_maxrss * 1024


def test_the_command_line_refuses_an_impossible_budget_in_one_line(tmp_path, data_dir):
    ckpt = save_model(tmp_path / "m.safetensors", tiny_model(dtype=torch.float32))
    code, stdout, stderr, _ = _slimtune(
        "eval", "--checkpoint", ckpt, "--data", data_dir / "ptb.valid.txt", "--mem-budget", "1MB", "--device", "cpu"
    )
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "cannot fit even C = 1" in stderr and "--mem-budget" in stderr


def test_a_fresh_eval_process_peaks_within_its_budget(tmp_path, data_dir):
    """Unplanned, 8 sequences of L = 8192 at once would hold about 1 GB of activations; under 550MB the plan picks a
    smaller forward, and the process's peak resident memory (VmHWM, from the kernel) stays within the budget."""
    L, budget = 8192, 550_000_000
    model = tiny_model(dtype=torch.float32, hidden_dim=64, ffn_dim=256, n_heads=2, n_layers=2)
    ckpt = save_model(tmp_path / "m.safetensors", model)
    code, stdout, stderr, peak = _slimtune(
        "eval", "--checkpoint", ckpt, "--data", data_dir / "ptb.valid.txt", "--seq-len", L, "--max-bytes", 8 * L + 1,
        "--mem-budget", "550MB", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["budget_bytes"] == budget and result["predicted_peak_bytes"] <= budget
    assert (result["chunk_size"], result["batch_size"]) < (L, 8)  # the budget bound the choice
    # The process's own VmHWM (a new address space's, from exec on). Not the child's ru_maxrss: Linux carries the
    # forked parent's high-water mark into it, and beside a test run grown to 684 MB it read 684 MB for a child
    # whose VmHWM was 497 MB.
    assert result["peak_memory_bytes"] <= budget, (peak, result)
    assert f"C = {result['chunk_size']}" in stderr and "budget 550.00 MB" in stderr
