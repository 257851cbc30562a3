"""Scoring (slimtune/evaluation.py): evaluate's bits per character equal the mean next-byte cross-entropy / ln 2
computed by hand from the full forward pass over the same sequences (the last, shorter one included), at 1024 bytes
a sequence by default whatever L the checkpoint was trained at; the one-step adaptation protocol against the same
steps written out with plain autograd, and with SLiM at any C against full backprop; the copy task's accuracy by
hand; and bad arguments named."""

import math

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.checkpoint import save_checkpoint
from slimtune.data import copy_windows
from slimtune.errors import ConfigError
from slimtune.evaluation import DEFAULT_SEQ_LEN, adapt_one_step, copy_accuracy, evaluate
from slimtune.model import PerformerLM


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
