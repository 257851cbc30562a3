"""Byte-level data (slimtune/data.py): a file's bytes read as token ids, files that are checkpoints told from text
(a real safetensors file, a torch.save zip, an old torch.save pickle), each refusal naming its parameter; the
contract's first windows, random windows and the copy task against the file's bytes and the task's definition; the
held-out split's sizes; and the seeded batches `fit` draws."""

import re

import pytest
import torch
from helpers import save_model, tiny_model

from slimtune.data import (
    COPY_SEPARATOR,
    batches,
    check_vocabulary,
    checkpoint_kind,
    copy_windows,
    first_windows,
    random_windows,
    read_bytes,
    split_held_out,
)
from slimtune.errors import DataError


@pytest.fixture(scope="module")
def text(data_dir):
    return (data_dir / "ptb.valid.txt").read_bytes()[:20_000]


def _as_tensor(raw: bytes) -> torch.Tensor:
    return torch.tensor(list(raw), dtype=torch.uint8)


# ---------------------------------------------------------------- what a file is


def test_checkpoint_kind_tells_model_files_from_text(tmp_path, data_dir):
    tensors = {k: v.contiguous() for k, v in tiny_model(dtype=torch.float32).state_dict().items()}
    save_model(tmp_path / "m.safetensors", tiny_model(dtype=torch.float32))
    torch.save(tensors, tmp_path / "zip.pt")
    torch.save(tensors, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "short.txt").write_bytes(b"hi")
    (tmp_path / "brace.txt").write_bytes(b'12345678{"not a header length"}')  # the header length exceeds the file
    assert checkpoint_kind(tmp_path / "m.safetensors") == "safetensors"
    assert checkpoint_kind(tmp_path / "zip.pt") == "zip"
    assert checkpoint_kind(tmp_path / "old.pt") == "pickle"
    assert checkpoint_kind(data_dir / "ptb.valid.txt") is None
    assert checkpoint_kind(data_dir / "tinyshakespeare.txt") is None
    assert checkpoint_kind(tmp_path / "short.txt") is None
    assert checkpoint_kind(tmp_path / "brace.txt") is None


def test_read_bytes_gives_the_files_bytes(tmp_path):
    raw = bytes(range(256)) * 3
    (tmp_path / "all.bin").write_bytes(raw)
    data = read_bytes(tmp_path / "all.bin")
    assert data.dtype == torch.uint8 and data.tolist() == list(raw)


@pytest.mark.parametrize(
    "case, message, params",
    [
        ("missing", "does not exist", ("eval_data",)),
        ("folder", "is a directory", ("eval_data",)),
        ("empty", "is empty", ("eval_data",)),
        ("short", "has 5 bytes but needs at least 9", ("eval_data", "seq_len")),
        ("model", "is a model file (safetensors), not text", ("eval_data",)),
        ("zip", "is a model file (zip), not text", ("eval_data",)),
    ],
)
def test_read_bytes_refuses_what_is_no_text_and_names_the_parameter(tmp_path, case, message, params):
    paths = {"missing": tmp_path / "nope.txt", "folder": tmp_path}
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"abcde")
    save_model(tmp_path / "model", tiny_model(dtype=torch.float32))
    torch.save({"w": torch.zeros(3)}, tmp_path / "zip")
    with pytest.raises(DataError, match=re.escape(message)) as info:
        read_bytes(paths.get(case, tmp_path / case), min_length=9, what="eval_data")
    assert info.value.params == params and "eval_data" in str(info.value)


def test_check_vocabulary():
    data = _as_tensor(b"plain ascii text")
    check_vocabulary(data, 128)  # all bytes < 128
    check_vocabulary(_as_tensor("café".encode()), 256)
    check_vocabulary(_as_tensor("café".encode()), 0xC3 + 1)  # é is bytes 0xc3 0xa9: the largest is 195
    with pytest.raises(DataError, match="byte values up to 195") as info:
        check_vocabulary(_as_tensor("café".encode()), 0xC3, what="eval_data")
    assert info.value.params == ("eval_data",) and "only 195 ids" in str(info.value)


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("batch_size, seq_len", [(1, 1), (1, 64), (3, 10), (4, 100)])
def test_first_windows_are_the_files_bytes(text, batch_size, seq_len):
    windows = first_windows(_as_tensor(text), batch_size, seq_len)
    assert windows.shape == (batch_size, seq_len + 1) and windows.dtype == torch.int64
    for b in range(batch_size):  # row b is bytes [b L, b L + L + 1): consecutive rows overlap by one byte
        assert windows[b].tolist() == list(text[b * seq_len : b * seq_len + seq_len + 1])


def test_first_windows_need_enough_bytes():
    data = _as_tensor(b"x" * 31)
    assert first_windows(data, 3, 10).shape == (3, 11)  # 2 * 10 + 11 = 31 bytes: just enough
    with pytest.raises(DataError, match="needs 33") as info:  # 16 + 17
        first_windows(data, 2, 16)
    assert info.value.params == ("seq_len", "batch_size")


def test_random_windows_are_stretches_of_the_file(text):
    windows = random_windows(_as_tensor(text), 6, 50, torch.Generator().manual_seed(0))
    assert windows.shape == (6, 51) and windows.dtype == torch.int64
    starts = set()
    for row in windows.tolist():
        start = text.find(bytes(row))
        assert start >= 0, "a window that is not a stretch of the file"
        starts.add(start)
    assert len(starts) > 1  # not the same offset every time
    again = random_windows(_as_tensor(text), 6, 50, torch.Generator().manual_seed(0))
    assert torch.equal(again, windows)
    with pytest.raises(DataError, match="fewer than `seq_len`") as info:
        random_windows(_as_tensor(b"abc"), 1, 3, torch.Generator())
    assert info.value.params == ("seq_len",)


def test_copy_windows():  # moved from test_recipes.py
    windows, mask = copy_windows(3, 20, 5, torch.Generator().manual_seed(0))
    assert windows.shape == (3, 21) and mask.shape == (3, 20)
    assert torch.equal(windows[:, :10], windows[:, 11:21]) and (windows[:, 10] == COPY_SEPARATOR).all()
    assert windows[:, :10].min() >= 1 and windows[:, :10].max() <= 5
    targets = windows[:, 1:]
    assert torch.equal(targets[mask.bool()].view(3, 10), windows[:, :10])  # the mask keeps exactly the copy


def test_copy_windows_of_odd_length_and_bad_sizes():
    windows, mask = copy_windows(2, 9, 255, torch.Generator().manual_seed(1))  # n = 4 symbols, one trailing pad
    assert windows.shape == (2, 10) and mask.shape == (2, 9)
    assert torch.equal(windows[:, :4], windows[:, 5:9]) and (windows[:, 4] == 0).all() and (windows[:, 9] == 0).all()
    assert mask.sum(1).tolist() == [4.0, 4.0] and mask[:, 4:8].eq(1).all()
    for bad in ((2, 1, 5), (2, 8, 0), (2, 8, 256)):
        with pytest.raises(DataError, match="copy task"):
            copy_windows(*bad, torch.Generator())


# ---------------------------------------------------------------- held out, batches


@pytest.mark.parametrize("n, fraction, train", [(1000, 0.1, 900), (1000, 0.25, 750), (10, 0.5, 5), (7, 0.3, 4)])
def test_split_held_out_sizes(n, fraction, train):
    data = torch.arange(n) % 256
    head, tail = split_held_out(data, fraction)
    assert head.numel() == train and tail.numel() == n - train  # the cut is int(n * (1 - fraction))
    assert torch.equal(torch.cat([head, tail]), data)  # the held-out part is the end of the file, nothing lost


@pytest.mark.parametrize("n, fraction", [(1000, 0.0), (1000, 1.0), (1000, -0.1), (1000, 1.5), (1000, 0.999), (3, 0.5)])
def test_split_held_out_refuses_a_split_that_leaves_too_little(n, fraction):
    with pytest.raises(DataError, match="eval_fraction") as info:
        split_held_out(torch.zeros(n, dtype=torch.uint8), fraction)
    assert info.value.params == ("eval_fraction",)


def test_batches_are_seeded_windows_of_the_file(tmp_path, text):
    (tmp_path / "my.txt").write_bytes(text)
    drawn = list(batches(tmp_path / "my.txt", seq_len=32, batch_size=3, steps=4, seed=5))
    assert len(drawn) == 4 and all(b.shape == (3, 33) and b.dtype == torch.int64 for b in drawn)
    for batch in drawn:
        for row in batch.tolist():
            assert text.find(bytes(row)) >= 0
    same = list(batches(_as_tensor(text), seq_len=32, batch_size=3, steps=4, seed=5))  # bytes or a path alike
    assert all(torch.equal(a, b) for a, b in zip(drawn, same, strict=True))
    other = list(batches(_as_tensor(text), seq_len=32, batch_size=3, steps=4, seed=6))
    assert not all(torch.equal(a, b) for a, b in zip(drawn, other, strict=True))
    endless = batches(_as_tensor(text), seq_len=8)
    assert [next(endless).shape for _ in range(50)] == [(1, 9)] * 50
    (tmp_path / "short.txt").write_bytes(b"ab")
    with pytest.raises(DataError, match="needs at least 33"):
        next(batches(tmp_path / "short.txt", seq_len=32))
