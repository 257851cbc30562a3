"""Data as users have it (CONTRACT.md section 5), read as one stream of token ids: a text file as raw bytes (ids
0..255, a byte-level model), or encoded with a tokenizer; `.npy` and `.bin` token ids, memory-mapped; `.jsonl`
records of text or prompt and completion, whose loss mask keeps the completions' predictions. Windows of L + 1
tokens (L inputs and the L next tokens they predict) are cut from the stream."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .choices import DataDtype
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


def _checked_file(path: str | os.PathLike, what: str, min_length: int = 1) -> Path:
    """`path` as a readable data file: it exists, is a file with at least `min_length` bytes, and is no checkpoint."""
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
    return path


def read_bytes(path: str | os.PathLike, *, min_length: int = 2, what: str = "data") -> torch.Tensor:
    """The file's bytes as a uint8 tensor [N], memory-mapped so large files are not copied into RAM. `what`:
    the parameter the path came from, named in errors. A file that is recognisably a checkpoint is refused."""
    path = _checked_file(path, what, min_length)
    try:
        return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read `{what}` file {path} ({e}): check its permissions", params=(what,)) from None


BYTE_VOCAB = 256  # a byte-level model's vocabulary: text is read as its raw bytes
DATA_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}  # the ids of a .bin file (choices.DataDtype)
SCAN_IDS = 1 << 24  # ids read at a time when a token file is checked against the vocabulary


@dataclass(frozen=True)
class Tokens:
    """A data file as the model reads it."""

    ids: torch.Tensor  # [N] token ids (uint8 bytes, or the file's integer dtype), memory-mapped for files of ids
    mask: torch.Tensor | None = None  # [N] bool: the loss counts the prediction of token n (None: of every token)
    n_bytes: int | None = None  # the text's UTF-8 bytes behind the ids, where known (bits per byte)
    mapping: mmap.mmap | None = field(default=None, repr=False, compare=False)  # a file of ids, mapped

    def release(self) -> None:
        """Hand back the pages of a mapped file that windows were read from (they are read again from the file
        when needed): a step holds only its own windows' pages, however large the file."""
        if self.mapping is not None:
            self.mapping.madvise(mmap.MADV_DONTNEED)

    def __len__(self) -> int:
        return self.ids.numel()

    @property
    def are_bytes(self) -> bool:
        """Raw bytes (a byte-level model's text): each token is one byte."""
        return self.ids.dtype == torch.uint8

    def held_bytes(self, windows: int, window_tokens: int) -> int:
        """What the process holds of this data while it reads `windows` windows of `window_tokens` tokens: a mapped
        file only their pages (one more at each end), released after each draw; data in memory, all of it."""
        if self.mapping is not None:
            size = min(self.ids.numel(), window_tokens) * self.ids.element_size()
            return windows * (size + 2 * mmap.PAGESIZE)
        return sum(t.untyped_storage().nbytes() for t in (self.ids, self.mask) if t is not None)

    def shares_memory(self, other: Tokens) -> bool:
        """Both views of the same data in memory (a held-out split of it)."""
        same = self.ids.untyped_storage().data_ptr() == other.ids.untyped_storage().data_ptr()
        return self.mapping is None and same

    def split(self, fraction: float) -> tuple[Tokens, Tokens]:
        """(training part, held-out part): the last `fraction` of the stream is held out."""
        train, held = split_held_out(self.ids, fraction)
        cut = train.numel()
        part = lambda t, s: None if t is None else t[s]  # noqa: E731
        first, rest = part(self.mask, slice(0, cut)), part(self.mask, slice(cut, None))
        return Tokens(train, first, mapping=self.mapping), Tokens(held, rest, mapping=self.mapping)


def as_tokens(
    data: Tokens | torch.Tensor | str | os.PathLike | None,
    *,
    vocab_size: int = BYTE_VOCAB,
    tokenizer: str | os.PathLike | None = None,
    data_dtype: DataDtype | str = DataDtype.UINT16,
    what: str = "data",
) -> Tokens | None:
    """`data` as Tokens: a path read by read_data, a caller's tensor of ids as it is (bytes: each its own byte),
    Tokens (or None) unchanged. A tensor's ids are the caller's to check (check_vocabulary)."""
    if data is None or isinstance(data, Tokens):
        return data
    if isinstance(data, torch.Tensor):
        return Tokens(data, n_bytes=data.numel() if data.dtype == torch.uint8 else None)
    return read_data(data, vocab_size=vocab_size, tokenizer=tokenizer, data_dtype=data_dtype, what=what)


def held_while_training(
    data: Tokens | None, eval_data: Tokens | None, *, windows: int, seq_len: int, eval_tokens: int | None
) -> int:
    """What a training process holds of its data (Tokens.held_bytes): each step's `windows` windows of seq_len + 1
    tokens, and the held-out scoring's first `eval_tokens` (None: all), unless the held-out part is a view of the
    training data in memory (a split of it), counted already."""
    held = data.held_bytes(windows, seq_len + 1) if data is not None else 0
    if eval_data is not None and not (data is not None and eval_data.shares_memory(data)):
        held += eval_data.held_bytes(1, eval_tokens or len(eval_data))
    return held


def tokenizer_for(checkpoint: str | os.PathLike | None, given: str | os.PathLike | None) -> Path | None:
    """The tokenizer a command uses: the one given, else the tokenizer.json an hf checkpoint folder carries."""
    if given is not None:
        return Path(given)
    beside = Path(checkpoint) / "tokenizer.json" if checkpoint is not None else None
    return beside if beside is not None and beside.is_file() else None


def load_tokenizer(path: str | os.PathLike, what: str = "tokenizer"):
    """A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library (an optional extra)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            f"`{what}` needs the `tokenizers` package: pip install 'slimtune[tokenizers]'", params=(what,)
        ) from None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"`{what}` file {path} does not exist: pass a tokenizer.json", params=(what,))
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on a malformed file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"`{what}` file {path} is not a tokenizer.json ({first})", params=(what,)) from None


def check_tokenizer(tokenizer, vocab_size: int, path) -> None:
    """A tokenizer whose vocabulary is not the model's would give ids the model has no row for, or miss some."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise DataError(
            f"`tokenizer` {path} has {size} tokens but the model's vocabulary has {vocab_size}: pass the tokenizer "
            "the model was trained with",
            params=("tokenizer",),
        )


def read_data(
    path: str | os.PathLike,
    *,
    vocab_size: int = BYTE_VOCAB,
    tokenizer: str | os.PathLike | None = None,
    data_dtype: DataDtype | str = DataDtype.UINT16,
    what: str = "data",
) -> Tokens:
    """A data file in any of the contract's forms, by its suffix: `.npy` (token ids, `numpy.save`), `.bin` (raw
    little-endian ids in `data_dtype`), `.jsonl` (text or prompt and completion records), any other: text, encoded
    with `tokenizer` (a tokenizer.json) or read as raw bytes for a byte-level model (vocab_size 256). Files of ids
    are memory-mapped; every id is checked against `vocab_size` (DataError naming `what` otherwise)."""
    path = _checked_file(path, what)
    encoder = None
    if tokenizer is not None:
        encoder = load_tokenizer(tokenizer)
        check_tokenizer(encoder, vocab_size, tokenizer)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".bin"):
        dtype, offset = _id_layout(path, suffix, data_dtype, what)
        hint = " (or a .bin of another `data_dtype`)" if suffix == ".bin" else ""
        _check_ids_in_file(path, dtype, offset, vocab_size, what, hint)
        return _mapped(path, dtype, offset)
    if encoder is None and vocab_size != BYTE_VOCAB:
        raise DataError(
            f"`{what}` {path} holds text, but the model's vocabulary has {vocab_size} ids, not {BYTE_VOCAB} bytes: "
            "pass the `tokenizer` it was trained with (a tokenizer.json), or token ids (.npy, .bin)",
            params=(what, "tokenizer"),
        )
    if suffix == ".jsonl":
        return _records(path, encoder, what)
    if encoder is None:
        return replace(_mapped(path, np.dtype(np.uint8), 0), n_bytes=path.stat().st_size)
    text = _text(path.read_bytes(), path, what)
    ids = np.asarray(encoder.encode(text, add_special_tokens=False).ids, dtype=np.int32)  # 4 bytes a token
    return Tokens(torch.from_numpy(ids), n_bytes=path.stat().st_size)


def _id_layout(path: Path, suffix: str, data_dtype: str, what: str) -> tuple[np.dtype, int]:
    """(dtype, offset of the first id) of a .npy or .bin file of ids."""
    if suffix == ".bin":
        data_dtype = str(DataDtype.parse(data_dtype, "data_dtype"))
        dtype = np.dtype(DATA_DTYPES[data_dtype])
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(
                f"`{what}` file {path} has {size} bytes, not a whole number of {data_dtype} ids ({dtype.itemsize} "
                f"bytes each): check `data_dtype`, or that the file is complete",
                params=(what, "data_dtype"),
            )
        return dtype, 0
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header; maps, touches no id
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"`{what}` file {path} is not a .npy array ({e})", params=(what,)) from None
    if header.ndim != 1 or header.dtype.kind not in "iu":
        raise DataError(
            f"`{what}` file {path} holds a {header.ndim}-D {header.dtype} array: token ids are a 1-D integer array",
            params=(what,),
        )
    if not header.dtype.isnative:
        raise DataError(
            f"`{what}` file {path} holds ids in a non-native byte order: save them as native integers", params=(what,)
        )
    return header.dtype, header.offset


def _mapped(path: Path, dtype: np.dtype, offset: int) -> Tokens:
    """The file's ids, memory-mapped copy-on-write (nothing is ever written back): a step reads only the pages of
    its windows, and `Tokens.release` hands them back."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    ids = np.frombuffer(mapping, dtype=dtype, offset=offset)
    return Tokens(torch.from_numpy(ids), mapping=mapping)


def _check_ids_in_file(path: Path, dtype: np.dtype, offset: int, vocab_size: int, what: str, hint: str) -> None:
    """_check_ids over the file read SCAN_IDS ids at a time, not mapped: the process never holds more than a block."""
    with open(path, "rb") as f:
        f.seek(offset)
        start = 0
        while (block := np.fromfile(f, dtype=dtype, count=SCAN_IDS)).size:
            _check_ids(block, vocab_size, what, f"`{what}` file {path}", hint, start)
            start += block.size


def _check_ids(ids: np.ndarray, vocab_size: int, what: str, source: str, hint: str = "", first: int = 0) -> None:
    """Every id in 0..vocab_size - 1, SCAN_IDS at a time; `first`: the position of ids[0] in the stream."""
    for start in range(0, ids.size, SCAN_IDS):
        block = ids[start : start + SCAN_IDS]
        if int(block.min()) < 0 or int(block.max()) >= vocab_size:
            at = int(np.argmax((block < 0) | (block >= vocab_size)))
            raise DataError(
                f"{source} holds token id {int(block[at])} at position {first + start + at}, outside the model's "
                "vocabulary of "
                f"{vocab_size} ids: pass ids made with the model's tokenizer{hint}",
                params=(what, "data_dtype") if hint else (what,),
            )


def _text(raw: bytes, path: Path, what: str, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = f"line {line}" if line is not None else f"byte {e.start}"
        raise DataError(
            f"`{what}` file {path} is not UTF-8 text ({at}): a tokenizer encodes text", params=(what,)
        ) from None


def _records(path: Path, encoder, what: str) -> Tokens:
    """A .jsonl file's records joined into one stream, each its prompt then its completion (or its text), with
    nothing between records; the mask keeps the completions' tokens (every token of a text record)."""
    pieces, masks, n_bytes = [], [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            for text, counted in _record(raw, number, path, what):
                ids = encoder.encode(text, add_special_tokens=False).ids if encoder else list(text.encode("utf-8"))
                pieces.append(np.asarray(ids, dtype=np.int32))
                masks.append(np.full(len(ids), counted))
                n_bytes += len(text.encode("utf-8"))
    if not pieces:
        raise DataError(f"`{what}` file {path} holds no records: one JSON object a line", params=(what,))
    ids, mask = np.concatenate(pieces), np.concatenate(masks)
    if encoder is None:
        ids = ids.astype(np.uint8)
    return Tokens(torch.from_numpy(ids), torch.from_numpy(mask), n_bytes)


def _record(raw: bytes, number: int, path: Path, what: str) -> list[tuple[str, bool]]:
    """One .jsonl line's (text, counted by the loss) parts: [(text, True)] or [(prompt, False), (completion, True)]."""
    bad = f"`{what}` file {path}, line {number}"
    try:
        record = json.loads(_text(raw, path, what, number))
    except json.JSONDecodeError as e:
        raise DataError(f"{bad}: not JSON ({e.msg}, column {e.colno})", params=(what,)) from None
    if not isinstance(record, dict):
        raise DataError(f"{bad}: a record is a JSON object with `text`, or `prompt` and `completion`", params=(what,))
    if "text" in record and not {"prompt", "completion"} & record.keys():
        parts = [("text", True)]
    elif "prompt" in record and "completion" in record:
        parts = [("prompt", False), ("completion", True)]
    else:
        raise DataError(
            f"{bad}: a record has `text`, or `prompt` and `completion`; got {sorted(record)}", params=(what,)
        )
    for name, _ in parts:
        if not isinstance(record[name], str):
            raise DataError(f"{bad}: `{name}` is {type(record[name]).__name__}, not a string", params=(what,))
        if name != "prompt" and not record[name]:
            raise DataError(f"{bad}: `{name}` is empty: the loss would count nothing of it", params=(what,))
    return [(record[name], counted) for name, counted in parts]


def check_vocabulary(data: torch.Tensor, vocab_size: int, what: str = "data") -> None:
    """Every id of `data` in 0..vocab_size - 1. Byte data holds ids 0..255: a model whose vocabulary is smaller
    cannot read the bytes beyond it."""
    if data.numel() == 0 or (data.dtype == torch.uint8 and vocab_size >= BYTE_VOCAB):
        return
    if data.dtype == torch.uint8:
        top = int(data.max())
        if top >= vocab_size:
            raise DataError(
                f"`{what}` holds byte values up to {top}, but the model's vocabulary has only {vocab_size} ids: a "
                f"byte-level model needs vocab_size 256; or pass data whose bytes are all below {vocab_size}",
                params=(what,),
            )
        return
    _check_ids(data.cpu().numpy(), vocab_size, what, f"`{what}`")


def first_offsets(n: int, batch_size: int, seq_len: int) -> list[int]:
    """The contract's first batch (`one_step`): row b starts at token b L."""
    need = (batch_size - 1) * seq_len + seq_len + 1
    if n < need:
        raise DataError(
            f"data has {n} tokens; batch {batch_size} x seq len {seq_len} needs {need}: "
            "lower `seq_len` or `batch_size`, or pass more data",
            params=("seq_len", "batch_size"),
        )
    return [b * seq_len for b in range(batch_size)]


def random_offsets(n: int, batch_size: int, seq_len: int, generator: torch.Generator) -> list[int]:
    """batch_size seeded random starts of windows of seq_len + 1 tokens in a stream of n."""
    if n < seq_len + 1:
        raise DataError(
            f"data has {n} tokens, fewer than `seq_len` + 1 = {seq_len + 1}: lower `seq_len`", params=("seq_len",)
        )
    return torch.randint(0, n - seq_len, (batch_size,), generator=generator).tolist()


def windows_at(ids: torch.Tensor, offsets: list[int], seq_len: int) -> torch.Tensor:
    """The windows of seq_len + 1 ids at `offsets`. [B, L + 1], int64."""
    return torch.stack([ids[o : o + seq_len + 1].to(torch.int64) for o in offsets])


def mask_at(mask: torch.Tensor, offsets: list[int], seq_len: int) -> torch.Tensor:
    """The loss mask of the windows at `offsets`: position t predicts token t + 1. [B, L], float32."""
    return torch.stack([mask[o + 1 : o + seq_len + 1].to(torch.float32) for o in offsets])


def first_windows(data: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """The contract's first batch: row b is tokens [b L, b L + L + 1). [B, L + 1], int64."""
    return windows_at(data, first_offsets(data.numel(), batch_size, seq_len), seq_len)


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size windows of seq_len + 1 tokens at seeded random offsets. [B, L + 1], int64."""
    return windows_at(data, random_offsets(data.numel(), batch_size, seq_len, generator), seq_len)


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
