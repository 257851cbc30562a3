"""The export: a model's weights written as a checkpoint the original full model loads unchanged (CONTRACT.md
sections 2 and 4), one tensor at a time, and what that costs in memory (`export_bytes`, the planner's export line).

An adapted model exports the input's own tensors with each adapter merged in (`lora.merged_weight`); a base held
in another dtype than the file's is read again from the file (`read_tensor`), never cast back with a loss.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import lora
from .checkpoint import LazyTensors, expected_shapes, file_sha256, read_tensor, save_checkpoint
from .choices import ExportDtype, ExportFormat
from .errors import CheckpointError
from .model import Performer


def save_model(
    model: Performer,
    path: str | os.PathLike,
    *,
    format: ExportFormat | str = "safetensors",
    dtype: ExportDtype | str = "auto",
    metadata: dict | None = None,
    extra_config: dict | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write `model`'s weights as a checkpoint, atomically (PerformerLM.save_pretrained documents the arguments)."""
    cast = ExportDtype.parse(dtype, "dtype").dtype
    state = model.state_dict()
    maps = {f"{name}.weight": m for name, m in lora.adapters(model).items()}  # merged into the input's tensors
    out = {n: cast or _stored_dtype(model, n, state) for n in expected_shapes(model.config)}
    # Made, written and freed one at a time: the export holds one tensor, never a second copy of the model.
    tensors = LazyTensors(
        {n: (shape, out[n]) for n, shape in expected_shapes(model.config).items()},
        lambda n: _export_tensor(model, n, state, maps, out[n]),
    )
    source = model.source
    if source is not None:
        config = source.extra_config | (extra_config or {})
        provenance = {"base_checkpoint": source.path.name}
        if source.path.is_file():
            provenance["base_sha256"] = file_sha256(source.path)
    else:
        config, provenance = dict(extra_config or {}), {}
    return save_checkpoint(
        path,
        tensors,
        model.config,
        extra_config=config,
        provenance=provenance | (metadata or {}),
        fmt=ExportFormat.parse(format, "format"),
        tokenizer=tokenizer,
    )


def _stored_dtype(model: Performer, name: str, state: dict[str, torch.Tensor]) -> torch.dtype:
    """The tensor's dtype in the checkpoint the model was loaded from (its own for a new model)."""
    return (model.source.tensors[name] if model.source is not None else state[name]).dtype


def _export_tensor(model: Performer, name: str, state, maps: dict[str, lora.LoraLinear], out: torch.dtype):
    """One tensor of the export, on the host in `out`: the model's, or for an adapted model the input's own
    (CONTRACT.md section 4), with a target's adapter merged into it."""
    tensor = _base_tensor(model, name, state) if maps or name not in state else state[name].detach()
    if name in maps:
        tensor = lora.merged_weight(maps[name], tensor)
    return tensor.to("cpu", out).contiguous()


def _base_tensor(model: Performer, name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A base tensor as the input checkpoint holds it: from memory where memory holds it without loss (an fp32
    copy of fp32, bf16 or fp16), else read again from the checkpoint's file (a bf16 base of an fp32 input, or a
    quantized one, whose weights are not in memory at all)."""
    if name not in state:  # a quantized map (lora.quantize_base)
        if model.source is None:
            raise CheckpointError(
                f"{name} is held quantized, and the model was not read from a checkpoint: a quantized base exports "
                "from the checkpoint it was read from"
            )
        return read_tensor(model.source, name)
    held = state[name].detach()
    if model.source is None:
        return held
    kept = model.source.tensors[name].dtype
    if held.dtype == kept or (held.dtype == torch.float32 and kept in (torch.bfloat16, torch.float16)):
        return held.to("cpu", kept)
    return read_tensor(model.source, name)


def export_bytes(model: Performer, dtype: str | None = "auto") -> int:
    """What save_model(dtype=...) allocates besides the model at its peak, in bytes (the planner's export line).
    The export makes one tensor at a time and frees it once written, so this is the costliest single tensor
    (_export_cost). On a GPU the copies are the host's, and the device holds one merge's delta."""
    cast = ExportDtype.parse(dtype, "dtype").dtype
    state = model.state_dict()
    targets = {f"{name}.weight" for name in lora.adapters(model)}
    if next(model.parameters()).device.type != "cpu":
        return max((state[n].numel() * 4 for n in targets), default=0)
    peak = 0
    for n, shape in expected_shapes(model.config).items():
        stored = _stored_dtype(model, n, state)
        held = state[n].dtype if n in state else None  # None: held quantized, read again from the file
        cost = _export_cost(math.prod(shape), held, stored, cast or stored, adapted=bool(targets), target=n in targets)
        peak = max(peak, cost)
    return peak


def _export_cost(count: int, held, stored, out, *, adapted: bool, target: bool) -> int:
    """Bytes _export_tensor allocates at its peak for a tensor of `count` values, held in memory in `held`, stored in
    the input checkpoint in `stored`, exported in `out`."""

    def cast(dtype) -> int:  # the final cast to `out`, from a tensor in `dtype`
        return count * out.itemsize if out != dtype else 0

    if not adapted:
        return cast(held)
    base = count * stored.itemsize if held != stored else 0  # the input's tensor read again, or cast to its dtype
    if not target:
        return base + cast(stored)
    # lora.merged_weight: the fp32 sum beside the base, then its cast back to the input's dtype; the base goes, and
    # the merged weight (the sum itself when fp32) is cast to `out`.
    merge = base + count * 4 + (count * stored.itemsize if stored != torch.float32 else 0)
    return max(merge, count * stored.itemsize + cast(stored))
