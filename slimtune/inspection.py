"""What `inspect` reports of a checkpoint: the file alone (`describe`), and what fine-tuning it costs with each
optimizer (`inspect_checkpoint`, measured as the planner measures it)."""

from __future__ import annotations

import json
import math
import os

from .checkpoint import Checkpoint, load_checkpoint
from .choices import Optimizer
from .data import BYTE_VOCAB
from .planner import measure_optimizer_by_shape


def describe(checkpoint: Checkpoint) -> dict:
    """What `slimtune inspect` shows of the file alone: config, size, dtypes, provenance, tensors."""
    provenance = {}
    for key, value in checkpoint.metadata.items():
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(parsed, dict):
            provenance.update({f"{key.removeprefix('slimtune_')}.{k}": v for k, v in parsed.items()})
        else:
            provenance[key] = parsed
    return {
        "path": str(checkpoint.path),
        "config": checkpoint.config.to_dict() | checkpoint.extra_config,
        "tokenizer": _tokenizer(checkpoint, provenance),
        "parameters": checkpoint.parameters,
        "dtypes": checkpoint.dtypes,
        "file_bytes": checkpoint.path.stat().st_size,
        "provenance": provenance,
        "tensors": {
            name: (list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in checkpoint.tensors.items()
        },
    }


def _tokenizer(checkpoint: Checkpoint, provenance: dict) -> str:
    """How the checkpoint's text becomes ids: the tokenizer.json an hf folder carries, the one its training recorded,
    or raw bytes for a byte-level model."""
    beside = checkpoint.path / "tokenizer.json"
    if checkpoint.path.is_dir() and beside.is_file():
        return str(beside)
    if "provenance.tokenizer" in provenance:
        digest = provenance.get("provenance.tokenizer_sha256", "?")
        return f"{provenance['provenance.tokenizer']} (recorded in training; sha256 {digest})"
    return "bytes (byte-level)" if checkpoint.config.vocab_size == BYTE_VOCAB else "unknown: none recorded"


def inspect_checkpoint(path: str | os.PathLike, **model_flags) -> dict:
    """`describe` and the fixed memory cost of fine-tuning it with each optimizer in fp32: weights, gradients
    and the optimizer's state, measured (planner.measure_optimizer, as the planner measures it) one parameter
    shape at a time, so that inspecting a large checkpoint holds no more than its largest tensor."""
    checkpoint = load_checkpoint(path, **model_flags)
    shapes: dict[tuple[int, ...], int] = {}
    for t in checkpoint.tensors.values():
        shapes[tuple(t.shape)] = shapes.get(tuple(t.shape), 0) + 1
    weights = sum(4 * math.prod(shape) * count for shape, count in shapes.items())  # fp32
    costs = {name.value: 2 * weights + measure_optimizer_by_shape(shapes, name) for name in Optimizer}
    return describe(checkpoint) | {"fine_tuning_bytes": costs}
