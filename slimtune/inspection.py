"""What `inspect` reports of a checkpoint: the file alone (`describe`), and what fine-tuning it costs with each
optimizer and with LoRA on each base (`inspect_checkpoint`, measured as the planner measures it)."""

from __future__ import annotations

import json
import math
import os

from .checkpoint import Checkpoint, load_checkpoint
from .choices import LORA_COMPARED_RANK, LORA_DEFAULT_TARGETS, BaseDtype, Optimizer
from .data import BYTE_VOCAB
from .lora import read_dtypes
from .planner import measure_optimizer_by_shape
from .quant import stored_bytes


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
    """`describe` and the fixed memory cost of fine-tuning it: with each optimizer in fp32 (weights, gradients and
    the optimizer's state), and with LoRA r8 and adam on each base (`lora_cost`). The optimizers' state is
    measured (planner.measure_optimizer, as the planner measures it) one parameter shape at a time, so that
    inspecting a large checkpoint holds no more than its largest tensor."""
    checkpoint = load_checkpoint(path, **model_flags)
    shapes: dict[tuple[int, ...], int] = {}
    for t in checkpoint.tensors.values():
        shapes[tuple(t.shape)] = shapes.get(tuple(t.shape), 0) + 1
    weights = sum(4 * math.prod(shape) * count for shape, count in shapes.items())  # fp32
    costs = {name.value: 2 * weights + measure_optimizer_by_shape(shapes, name) for name in Optimizer}
    lora = {base.value: lora_cost(checkpoint, base) for base in BaseDtype}
    return describe(checkpoint) | {"fine_tuning_bytes": costs, "lora_bytes": lora}


def lora_cost(checkpoint: Checkpoint, base: BaseDtype, rank: int = LORA_COMPARED_RANK) -> int:
    """LoRA of `rank` on the default targets with adam, on a base held in `base`: the base's bytes (the layers'
    linear maps in its dtype or format, their biases bf16 with a bf16 base and fp32 otherwise, the rest fp32), and
    the adapters' fp32 weights, gradients and adam's state (measured)."""
    held_in = read_dtypes(base.held)  # what fit reads each tensor into for this base: a dtype or a format
    held, adapters = 0, {}
    for name, t in checkpoint.tensors.items():
        shape, target = tuple(t.shape), held_in(name)
        held += stored_bytes(shape, target) if isinstance(target, str) else target.itemsize * math.prod(shape)
        if name.endswith(".weight") and name.split(".")[-2] in LORA_DEFAULT_TARGETS:
            for part in ((rank, shape[1]), (shape[0], rank)):  # lora_A [R, in], lora_B [out, R]
                adapters[part] = adapters.get(part, 0) + 1
    trained = sum(4 * math.prod(shape) * count for shape, count in adapters.items())
    return held + 2 * trained + measure_optimizer_by_shape(adapters, Optimizer.ADAM)
