"""Checkpoint I/O (docs/format.md): contract .safetensors files, hf folders, reference state dicts, atomic export.

A contract checkpoint is one .safetensors file with the reference's tensor names and the model config as JSON in
the `slimtune_config` metadata. Also accepted: .safetensors files without that metadata, and state dicts saved
with torch.save (.pt/.pth/.bin), loaded with weights_only=True so no pickled code runs. What shapes cannot tell
(heads, feature type, layer-norm placement) comes from the caller (`n_heads`, `feature_type`,
`layernorm`). Every problem is found before any work starts and raised as a CheckpointError naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import atomic_write
from .choices import ExportDtype, ExportFormat, LayerNorm
from .config import PerformerConfig
from .errors import CheckpointError, ConfigError
from .memory import heap_policy_during
from .quant import Quantized, quantize
from .version import __version__

CONTRACT_KEYS = ("vocab_size", "hidden_dim", "n_layers", "ffn_dim", "n_heads", "feature_type", "on_gptln")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
HF_WEIGHTS = "model.safetensors"  # the weights file inside a --format hf folder
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The parameter (of load_checkpoint) that gives each setting a checkpoint may lack, and what it takes.
GIVEN_BY = {"n_heads": "n_heads", "feature_type": "feature_type", "on_gptln": "layernorm"}
TAKES = {"n_heads": "N", "feature_type": "sqr|relu|elu+1|abs|favor+", "on_gptln": "post|pre"}


def expected_shapes(config: PerformerConfig) -> dict[str, tuple[int, ...]]:
    """The contract's tensor names and shapes, in the reference's state_dict order."""
    d, f, v = config.hidden_dim, config.ffn_dim, config.vocab_size
    shapes = {"input_map.weight": (v, d // 2)}
    for i in range(config.n_layers):
        p = f"layers.{i}"
        for name in ("q_map", "k_map", "v_map"):
            shapes[f"{p}.attention.{name}.weight"] = (d, d)
            shapes[f"{p}.attention.{name}.bias"] = (d,)
        shapes[f"{p}.U_map.weight"], shapes[f"{p}.U_map.bias"] = (f, d), (f,)
        shapes[f"{p}.V_map.weight"], shapes[f"{p}.V_map.bias"] = (d, f), (d,)
        for name in ("layernorm1", "layernorm2"):
            shapes[f"{p}.{name}.weight"], shapes[f"{p}.{name}.bias"] = (d,), (d,)
    shapes["output_logit_map.weight"], shapes["output_logit_map.bias"] = (v, d), (v,)
    return shapes


@dataclass
class Checkpoint:
    """A validated checkpoint: its config, tensors (in the file's dtypes) and metadata."""

    path: Path
    config: PerformerConfig
    tensors: dict[str, torch.Tensor | Quantized]  # Quantized: read as a quantized base (load_checkpoint's dtype)
    extra_config: dict = field(default_factory=dict)  # slimtune_config keys beyond the seven (seq_len, ...)
    metadata: dict[str, str] = field(default_factory=dict)  # the file's other metadata (provenance)
    stored: dict[str, torch.dtype] = field(default_factory=dict)  # the file's dtypes where `tensors` were converted

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def stored_dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype in the file (what an export keeps), whatever it was read into."""
        return self.stored[name] if name in self.stored else self.tensors[name].dtype

    @property
    def dtypes(self) -> list[str]:
        return sorted({str(self.stored_dtype(n)).removeprefix("torch.") for n in self.tensors})

    def release(self) -> None:
        """Drop the tensor data once a model holds the weights, keeping names, shapes and the file's dtypes for
        export."""
        self.tensors = {
            name: torch.empty(t.shape, dtype=self.stored_dtype(name), device="meta") for name, t in self.tensors.items()
        }
        self.stored = {}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if path.is_dir() and not (path / HF_WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint {path} is a folder without model.safetensors: pass the checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty: re-export or re-download it")


def _looks_like_text(path: Path) -> bool:
    """Text, not a checkpoint: printable UTF-8 with no NUL byte (a safetensors file begins with its header's
    length as 8 little-endian bytes, which hold NULs)."""
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\x00" not in text and sum(c.isprintable() or c in "\n\r\t" for c in text) >= 0.95 * len(text)


def _check_not_text(path: Path) -> None:
    if path.is_file() and _looks_like_text(path):
        raise CheckpointError(
            f"{path} is not a checkpoint: it holds text. Pass the model file (.safetensors, or a torch.save "
            "state dict .pt/.pth/.bin); text goes to `data`",
            params=("data",),
        )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _check_not_text(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and truncation
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({str(e).splitlines()[0]}): the file is truncated or not a "
            "safetensors file; re-export it, or use a .pt/.pth/.bin suffix for a torch.save state dict"
        ) from None
    return tensors, metadata


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# The order save_file lays tensors out in: by dtype, its Dtype enum descending (the widest alignment first), then by
# name. Measured with safetensors 0.8.0 (tests/test_checkpoint.py compares the layouts).
SAFETENSORS_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint ({why}): the file is truncated or not a safetensors file; "
        "re-export it, or use a .pt/.pth/.bin suffix for a torch.save state dict"
    )


def _safetensors_header(f, path: Path) -> tuple[int, dict[str, str], list[tuple[str, dict]]]:
    """An open .safetensors file's header: its length, the metadata, and the tensor entries in file order."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= size - 8:
        raise _unreadable(path, "no valid header length")
    try:
        header = json.loads(f.read(n))
        metadata = dict(header.pop("__metadata__", None) or {})
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise _unreadable(path, f"header: {e}") from None
    return n, metadata, entries


def _read_entry(f, path: Path, n: int, name: str, info: dict) -> torch.Tensor:
    """The tensor of header entry `info`, read into memory of its own with plain reads."""
    try:
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"])
        begin, end = info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise _unreadable(path, f"tensor {name}: {e}") from None
    if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > os.fstat(f.fileno()).st_size:
        raise _unreadable(path, f"tensor {name} runs past the end of the file")
    tensor = torch.empty(shape, dtype=dtype)
    f.seek(8 + n + begin)
    if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
        raise _unreadable(path, f"tensor {name} is cut short")
    return tensor


def _stream_safetensors(path: Path, dtype_for) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """A .safetensors file read tensor by tensor with plain reads, each converted at once to `dtype_for(name)`
    (None: kept): at most one tensor in the file's dtype is held beside the converted ones. (safe_open maps the
    file, and every page read stays resident until the last tensor on the mapping goes: converting from it held
    the whole file beside the result.) Returns the tensors, the metadata, and the file's dtypes of those
    converted."""
    _check_not_text(path)
    with open(path, "rb") as f:
        n, metadata, entries = _safetensors_header(f, path)
        tensors, stored = {}, {}
        # Quantizing makes a few MB of temporaries per tile beside what stays: under glibc's dynamic threshold they
        # fragment the heap (a 67 MB checkpoint read as nf4 peaked 23-75 MB above the start from run to run); with
        # blocks of 1 MB and more mmap'ed (memory.py's "lean") they leave as they are freed: 23-27 MB.
        quantizing = dtype_for is not None and any(isinstance(dtype_for(name), str) for name, _ in entries)
        with heap_policy_during("lean" if quantizing else None):
            _read_entries(f, path, n, entries, dtype_for, tensors, stored)
    return tensors, metadata, stored


def _read_entries(f, path: Path, n: int, entries, dtype_for, tensors: dict, stored: dict) -> None:
    """_stream_safetensors' loop: each entry read, then converted at once, into `tensors` (and `stored`)."""
    for name, info in entries:
        tensor = _read_entry(f, path, n, name, info)
        if _converts(tensor, target := dtype_for(name) if dtype_for else None):
            tensors[name], stored[name] = _converted(tensor, target), tensor.dtype
            del tensor
        else:
            tensors[name] = tensor


def _converts(tensor: torch.Tensor, target) -> bool:
    """Whether `target` (a torch.dtype, a quantized format, or None: kept) changes the tensor; a non-float tensor
    is never quantized (validate_tensors refuses it as it is)."""
    if isinstance(target, str):
        return tensor.dtype.is_floating_point and tensor.dim() == 2
    return target is not None and target != tensor.dtype


def _converted(tensor: torch.Tensor, target) -> torch.Tensor | Quantized:
    """The tensor in `target`: a torch.dtype, or a quantized format ("int8", "nf4"; quant.py) as Quantized. A
    non-finite weight gives non-finite scales, which validate_tensors refuses."""
    return quantize(tensor, target) if isinstance(target, str) else tensor.to(target)


def _read_torch(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors ({str(e).splitlines()[0][:120]}); "
            "only plain state dicts are loaded, so no code in the file runs. "
            "Re-save it with torch.save(model.state_dict())"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} as a torch.save file ({str(e).splitlines()[0][:160]}): re-save it"
        ) from None
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors: save model.state_dict() with torch.save")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _infer_sizes(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """vocab_size, hidden_dim, n_layers and ffn_dim, read from the shapes."""
    try:
        vocab, half = tensors["input_map.weight"].shape
        n_layers = 0
        while f"layers.{n_layers}.attention.q_map.weight" in tensors:
            n_layers += 1
        ffn = tensors["layers.0.U_map.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(
            f"{path} does not have the reference Performer layout (input_map.weight, layers.0.U_map.weight, ...): "
            "is it a slimtune/SLiM Performer checkpoint?"
        ) from None
    return dict(vocab_size=int(vocab), hidden_dim=2 * int(half), n_layers=n_layers, ffn_dim=int(ffn))


def _config(saved: dict | None, tensors, path: Path, overrides: dict) -> tuple[PerformerConfig, dict]:
    """The model config: the file's, or one built from shapes and overrides; and the file's extra keys."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if saved is None:
        values = _infer_sizes(tensors, path) | overrides
        missing = [k for k in ("n_heads", "feature_type", "on_gptln") if k not in values]
        if missing:
            wanted = " and ".join(f"`{GIVEN_BY[k]}` {TAKES[k]}" for k in missing)
            raise CheckpointError(
                f"{path} has no slimtune_config metadata: pass {wanted}", params=[GIVEN_BY[k] for k in missing]
            )
        extra = {}
    else:
        values = dict(saved)
        for key, value in overrides.items():
            if key in values and values[key] != value:
                raise CheckpointError(
                    f"{path} says {key} = {values[key]!r} but `{GIVEN_BY[key]}` gives {value!r}: "
                    f"leave `{GIVEN_BY[key]}` out",
                    params=(GIVEN_BY[key],),
                )
        extra = {k: v for k, v in saved.items() if k not in CONTRACT_KEYS}
    try:
        return PerformerConfig.from_dict(values), extra
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{path}: invalid slimtune_config ({e}): fix the metadata") from None


def validate_tensors(tensors: dict[str, torch.Tensor], config: PerformerConfig, path: Path) -> None:
    """Names, shapes, dtypes and finiteness; every mismatch is listed by name."""
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in tensors]
    unexpected = [n for n in tensors if n not in shapes]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(
            f"{path} does not match its config ({'; '.join(parts)}): check the layer count and sizes, or the file"
        )
    wrong = [
        f"{n} expected {list(s)} found {list(tensors[n].shape)}"
        for n, s in shapes.items()
        if tuple(tensors[n].shape) != s
    ]
    if wrong:
        raise CheckpointError(f"{path} has tensors of the wrong shape ({'; '.join(wrong[:4])}): check the config")
    odd = [f"{n} ({tensors[n].dtype})" for n in shapes if _values(tensors[n]).dtype not in FLOAT_DTYPES]
    if odd:
        raise CheckpointError(
            f"{path} has non-float tensors ({', '.join(odd[:4])}): weights must be fp32, fp16 or bf16"
        )
    bad = [n for n in shapes if not torch.isfinite(_values(tensors[n])).all()]
    if bad:
        raise CheckpointError(
            f"{path} has non-finite values (NaN or inf) in {', '.join(bad[:4])}: use an earlier checkpoint"
        )


def _values(t: torch.Tensor | Quantized) -> torch.Tensor:
    """What a tensor's dtype and finiteness are checked on: a quantized weight's scales (finite where the weight
    read was)."""
    return t.scales if isinstance(t, Quantized) else t


def load_checkpoint(
    path: str | os.PathLike,
    *,
    n_heads: int | None = None,
    feature_type: str | None = None,
    layernorm: str | None = None,
    dtype=None,
) -> Checkpoint:
    """Read and validate any accepted checkpoint. n_heads, feature_type and layernorm fill settings the file does
    not carry. `dtype`: the dtype to read the tensors into, one torch.dtype for all or a function of the tensor's
    name (None there: as stored; a quantized format, "int8" or "nf4": that weight quantized as it is read, a
    quant.Quantized); without it a .safetensors file is mapped, not copied. `Checkpoint.stored` keeps the file's
    dtypes of those converted, for export."""
    path = Path(path)
    _check_readable(path)
    if path.is_dir():  # a --format hf folder
        path = path / HF_WEIGHTS
    on_gptln = None if layernorm is None else LayerNorm.parse(layernorm, "layernorm").on_gptln
    overrides = dict(n_heads=n_heads, feature_type=feature_type, on_gptln=on_gptln)
    dtype_for = dtype if dtype is None or callable(dtype) else lambda _: dtype  # a torch.dtype is not callable
    stored = {}
    if path.suffix.lower() in TORCH_SUFFIXES:
        tensors, metadata = _read_torch(path), {}
        if dtype_for is not None:
            for name, t in list(tensors.items()):
                if _converts(t, target := dtype_for(name)):
                    tensors[name], stored[name] = _converted(t, target), t.dtype
    elif dtype_for is not None:
        tensors, metadata, stored = _stream_safetensors(path, dtype_for)
    else:
        tensors, metadata = _read_safetensors(path)
    saved = None
    if "slimtune_config" in metadata:
        try:
            saved = json.loads(metadata["slimtune_config"])
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{path} has invalid slimtune_config JSON ({e}): fix or remove the metadata"
            ) from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: slimtune_config must be a JSON object, got {type(saved).__name__}")
    config, extra = _config(saved, tensors, path, overrides)
    validate_tensors(tensors, config, path)
    other = {k: v for k, v in metadata.items() if k not in ("format", "slimtune_config")}
    return Checkpoint(path=path, config=config, tensors=tensors, extra_config=extra, metadata=other, stored=stored)


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """Tensor `name` of a checkpoint's file, as stored, read on its own (an export reads its base again one tensor
    at a time): from a .safetensors file with plain reads of its bytes alone; from a torch.save file through a
    mapping, of which only this tensor's pages are read (an old, non-zip file cannot be mapped and is read whole)."""
    path = checkpoint.path
    if path.suffix.lower() in TORCH_SUFFIXES:
        try:
            return _read_torch(path, mmap=True)[name]
        except CheckpointError:
            return _read_torch(path)[name]
    with open(path, "rb") as f:
        n, _, entries = _safetensors_header(f, path)
        return _read_entry(f, path, n, name, dict(entries)[name])


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_path(
    out: str | os.PathLike, *inputs: str | os.PathLike, fmt: str = "safetensors", replace: bool = True
) -> Path:
    """Refuse an output that would overwrite an input, or (without `replace`) any existing file or folder, or that
    cannot be written. Nothing is created here: a missing folder is made when the checkpoint is saved."""
    out = Path(out)
    fmt = ExportFormat.parse(fmt, "format")
    for src in inputs:
        if src is not None and Path(src).is_dir():  # an hf folder: its weights file is the input
            src = Path(src) / HF_WEIGHTS
        if src is not None and (same_file(out, src) or (fmt == "hf" and same_file(out / HF_WEIGHTS, src))):
            raise CheckpointError(
                f"output {out} is the same file as input {src}: choose another `out` path", params=("out",)
            )
    if fmt == "safetensors" and out.is_dir():
        raise CheckpointError(f"output {out} is a directory: give a file name such as {out / 'tuned.safetensors'}")
    if fmt == "hf" and out.exists() and not out.is_dir():
        raise CheckpointError(
            f"`format` hf writes a folder, but {out} is a file: choose another `out`", params=("format", "out")
        )
    if not replace and out.exists():
        raise CheckpointError(
            f"output {out} exists (and is not the output of a run this run folder holds): give `overwrite` to "
            "replace it, or another `out`",
            params=("overwrite", "out"),
        )
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CheckpointError(f"cannot write under {existing}: choose another `out`", params=("out",))
    return out


@dataclass(frozen=True)
class LazyTensors:
    """Tensors made one at a time, for a write that holds one of them: each one's shape and dtype known up front
    (they make the file's header), its values made by `make(name)` when it is written."""

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), in the caller's order
    make: Callable[[str], torch.Tensor]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> LazyTensors:
        return cls({n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, tensors.__getitem__)


def save_file(
    tensors: dict[str, torch.Tensor] | LazyTensors, path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """safetensors.torch.save_file, tensor by tensor: the header from the shapes and dtypes, then each tensor made,
    written and dropped before the next is made, so that writing holds one tensor, never the whole state
    (safetensors has no incremental writer). The layout is save_file's: tensors in SAFETENSORS_ORDER, the header
    JSON without spaces and padded with spaces to a multiple of 8 bytes. Only the metadata's order differs: here
    the dict's, there a hash map's (it varies from one call to the next)."""
    lazy = tensors if isinstance(tensors, LazyTensors) else LazyTensors.of(tensors)
    order = sorted(lazy.specs, key=lambda n: (SAFETENSORS_ORDER.index(SAFETENSORS_CODES[lazy.specs[n][1]]), n))
    header, offset = {"__metadata__": metadata}, 0
    for name in order:
        shape, dtype = lazy.specs[name]
        size = math.prod(shape) * dtype.itemsize
        code = SAFETENSORS_CODES[dtype]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in order:
            tensor = lazy.make(name).detach().to("cpu").contiguous()
            if (tuple(tensor.shape), tensor.dtype) != lazy.specs[name]:
                raise ValueError(f"{name} was made {tensor.dtype} {list(tensor.shape)}, not as its header says")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor  # freed before the next one is made


def _write_safetensors(path: Path, tensors: LazyTensors, metadata: dict[str, str]) -> None:
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata)


HF_CODE = ("configuration_slim_performer.py", "modeling_slim_performer.py")  # slimtune/hf_remote, copied as they are
HF_TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}


def _write_hf_folder(
    folder: Path, tensors: LazyTensors, metadata: dict[str, str], config: dict, tokenizer: Path | None
) -> None:
    """A Hugging Face model folder, built beside `folder` and swapped into place: model.safetensors, config.json
    with an auto_map to the modeling code written beside it, so that transformers loads it with
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True); with a `tokenizer`, its tokenizer.json and
    the tokenizer_config.json that lets AutoTokenizer.from_pretrained(folder) load it."""
    code = resources.files("slimtune") / "hf_remote"
    hf_config = {
        "architectures": ["SLiMPerformerForCausalLM"],
        "model_type": "slim_performer",
        "auto_map": {
            "AutoConfig": "configuration_slim_performer.SLiMPerformerConfig",
            "AutoModelForCausalLM": "modeling_slim_performer.SLiMPerformerForCausalLM",
        },
        "torch_dtype": str(next(iter(tensors.specs.values()))[1]).removeprefix("torch."),
    }
    with atomic_write(folder, folder=True) as tmp:
        save_file(tensors, tmp / HF_WEIGHTS, metadata)
        with open(tmp / "config.json", "w") as f:
            json.dump(hf_config | config, f, indent=2)
        for name in HF_CODE:
            (tmp / name).write_bytes((code / name).read_bytes())
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(HF_TOKENIZER_CONFIG, indent=2))


def save_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor] | LazyTensors,
    config: PerformerConfig,
    *,
    extra_config: dict | None = None,
    provenance: dict | None = None,
    fmt: str = "safetensors",
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write a contract checkpoint atomically (a temporary file in the destination folder, fsync, rename), so a
    crash leaves the previous file or the new one, never half of one. fmt "hf" writes a folder with
    model.safetensors and config.json instead (and the `tokenizer`'s tokenizer.json, when given). `tensors` as
    LazyTensors are made and written one at a time."""
    path, fmt = Path(path), ExportFormat.parse(fmt, "format")
    tensors = tensors if isinstance(tensors, LazyTensors) else LazyTensors.of(tensors)
    full_config = config.to_dict() | (extra_config or {})
    metadata = {"format": "pt", "slimtune_config": json.dumps(full_config), "slimtune_version": __version__}
    if provenance:
        metadata["slimtune_provenance"] = json.dumps(provenance)
    try:
        if fmt == ExportFormat.HF:
            _write_hf_folder(path, tensors, metadata, full_config, tokenizer and Path(tokenizer))
        else:
            _write_safetensors(path, tensors, metadata)
    except OSError as e:
        raise CheckpointError(
            f"cannot write {path} ({e.strerror or e}): free some space or choose another `out`", params=("out",)
        ) from None
    return path


def default_out(checkpoint: str | os.PathLike, fmt: str = "safetensors", *, resume: bool = False) -> Path:
    """Where `fit` writes when no out is given: NAME-tuned.safetensors beside the input (NAME-tuned-2, -3, ...
    when that exists), so that nothing is ever overwritten. With `resume`: the latest of those whose run folder
    (OUT.run) holds a saved run, the run being continued."""
    src = Path(checkpoint)
    stem = src.stem if src.is_file() or src.suffix else src.name
    suffix = ".safetensors" if ExportFormat.parse(fmt, "format") == ExportFormat.SAFETENSORS else ""
    names = (src.with_name(f"{stem}-tuned{'' if n == 1 else f'-{n}'}{suffix}") for n in range(1, 10_000))
    resumable = None
    for out in names:
        if (Path(f"{out}.run") / "state.pt").is_file():
            resumable = out
        if not out.exists():
            return resumable if resume and resumable is not None else out
    raise CheckpointError(f"no free output name beside {src}: give `out`", params=("out",))


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    fmt: str = "safetensors",
    n_heads: int | None = None,
    feature_type: str | None = None,
    layernorm: str | None = None,
    overwrite: bool = False,
) -> Checkpoint:
    """Write any accepted checkpoint (e.g. the reference code's torch.save state dict) as a contract checkpoint,
    bit for bit in each tensor's dtype unless `dtype` casts; an existing `out` only with `overwrite`. Returns the
    source checkpoint."""
    cast = ExportDtype.parse(dtype, "dtype").dtype
    target = check_output_path(out, src, fmt=fmt, replace=overwrite)
    ckpt = load_checkpoint(src, n_heads=n_heads, feature_type=feature_type, layernorm=layernorm)
    specs = {name: (tuple(t.shape), cast or t.dtype) for name, t in ckpt.tensors.items()}
    tensors = LazyTensors(specs, lambda name: ckpt.tensors[name].to(specs[name][1]))  # cast one at a time
    save_checkpoint(
        target,
        tensors,
        ckpt.config,
        extra_config=ckpt.extra_config,
        provenance={"converted_from": Path(src).name},
        fmt=fmt,
    )
    return ckpt
