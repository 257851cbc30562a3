"""Byte-level data: a file of raw bytes read as token ids 0..255, cut into windows of L + 1 bytes
(L inputs and the L next bytes they predict)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import DataError


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """ "safetensors", "zip" (torch.save) or "pickle" (an older torch.save) when the file's first bytes say it is a
    checkpoint rather than text; None otherwise."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = Path(path).stat().st_size
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ ") and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def read_bytes(path: str | os.PathLike, *, min_length: int = 2, what: str = "data") -> torch.Tensor:
    """The file's bytes as a uint8 tensor [N], memory-mapped so large files are not copied into RAM. `what`:
    the parameter the path came from, named in errors. A file that is recognisably a checkpoint is refused."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"`{what}` file {path} does not exist: check the path", params=(what,))
    if path.is_dir():
        raise DataError(f"`{what}` {path} is a directory: pass a text file", params=(what,))
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"`{what}` file {path} is empty: pass a file with text in it", params=(what,))
    if size < min_length:
        raise DataError(
            f"`{what}` file {path} has {size} bytes but needs at least {min_length}: pass more text or lower `seq_len`",
            params=(what, "seq_len"),
        )
    try:
        kind = checkpoint_kind(path)
    except OSError as e:
        raise DataError(
            f"cannot read `{what}` file {path} ({e.strerror or e}): check its permissions", params=(what,)
        ) from None
    if kind is not None:
        raise DataError(
            f"`{what}` file {path} is a model file ({kind}), not text: pass a text file as `{what}`",
            params=(what,),
        )
    try:
        return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read `{what}` file {path} ({e}): check its permissions", params=(what,)) from None


def check_vocabulary(data: torch.Tensor, vocab_size: int, what: str = "data") -> None:
    """Byte data holds ids 0..255: a model whose vocabulary is smaller cannot read the bytes beyond it."""
    if vocab_size >= 256 or data.numel() == 0:
        return
    top = int(data.max())
    if top >= vocab_size:
        raise DataError(
            f"`{what}` holds byte values up to {top}, but the model's vocabulary has only {vocab_size} ids: a "
            f"byte-level model needs vocab_size 256; or pass data whose bytes are all below {vocab_size}",
            params=(what,),
        )


def first_windows(data: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """The contract's first batch: row b is bytes [b L, b L + L + 1). [B, L + 1], int64."""
    need = (batch_size - 1) * seq_len + seq_len + 1
    if data.numel() < need:
        raise DataError(
            f"data has {data.numel()} bytes; batch {batch_size} x seq len {seq_len} needs {need}: "
            "lower `seq_len` or `batch_size`, or pass more text",
            params=("seq_len", "batch_size"),
        )
    rows = [data[b * seq_len : b * seq_len + seq_len + 1] for b in range(batch_size)]
    return torch.stack([r.to(torch.int64) for r in rows])


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size windows of seq_len + 1 bytes at seeded random offsets. [B, L + 1], int64."""
    if data.numel() < seq_len + 1:
        raise DataError(
            f"data has {data.numel()} bytes, fewer than `seq_len` + 1 = {seq_len + 1}: lower `seq_len`",
            params=("seq_len",),
        )
    offsets = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[o : o + seq_len + 1].to(torch.int64) for o in offsets.tolist()])


COPY_SEPARATOR = 0  # token between the symbols and their copy; symbols are 1..n_symbols


def copy_windows(
    batch_size: int, seq_len: int, n_symbols: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's copying task: windows [B, L + 1] of n random symbols, a separator, then the same n symbols
    (n = L // 2), and the loss mask [B, L] that keeps only the predictions of the copy."""
    if seq_len < 2 or not 1 <= n_symbols <= 255:
        raise DataError(f"copy task needs seq len >= 2 and 1..255 symbols, got {seq_len} and {n_symbols}")
    n = seq_len // 2
    symbols = torch.randint(1, n_symbols + 1, (batch_size, n), generator=generator)
    separator = torch.full((batch_size, 1), COPY_SEPARATOR, dtype=torch.int64)
    windows = torch.cat([symbols, separator, symbols], dim=1)
    windows = torch.nn.functional.pad(windows, (0, seq_len + 1 - windows.shape[1]))  # odd L: one trailing pad
    mask = torch.zeros(batch_size, seq_len)
    mask[:, n : 2 * n] = 1.0  # position t predicts byte t + 1: the copy is bytes n + 1 .. 2n
    return windows, mask


def split_held_out(data: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, held-out bytes): the last `fraction` of the file is held out for evaluation."""
    if not 0 < fraction < 1:
        raise DataError(f"`eval_fraction` must lie strictly between 0 and 1, got {fraction}", params=("eval_fraction",))
    cut = int(data.numel() * (1 - fraction))
    if cut < 2 or data.numel() - cut < 2:
        raise DataError(
            f"`eval_fraction` {fraction} leaves too little data on one side of {data.numel()} bytes",
            params=("eval_fraction",),
        )
    return data[:cut], data[cut:]


def batches(
    data: torch.Tensor | str | os.PathLike,
    *,
    seq_len: int,
    batch_size: int = 1,
    steps: int | None = None,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Seeded random windows of a byte file, as `slimtune fit` draws them: `steps` batches (None: without end)
    of [batch_size, seq_len + 1] int64 token ids, ready for `slim_step`.

    Example:
        for windows in slimtune.data.batches("my.txt", seq_len=4096, steps=100):
            loss = slimtune.slim_step(model, windows, chunk_size=512)
    """
    if not isinstance(data, torch.Tensor):
        data = read_bytes(data, min_length=seq_len + 1)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while steps is None or step < steps:
        yield random_windows(data, batch_size, seq_len, generator)
        step += 1
