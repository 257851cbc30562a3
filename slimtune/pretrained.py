"""PerformerLM: the Performer network (model.py) that reads and writes checkpoints. `from_pretrained` loads any
accepted checkpoint (checkpoint.py) onto the model without holding the weights twice; `save_pretrained` exports
(export.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .choices import ExportDtype, ExportFormat
from .config import PerformerConfig
from .devices import resolve_device
from .export import export_bytes, save_model
from .model import Performer
from .quant import Quantized, hold_quantized

__all__ = ["PerformerConfig", "PerformerLM"]


class PerformerLM(Performer):
    """The Performer language model of CONTRACT.md, loaded from and saved to checkpoints."""

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> PerformerLM:
        """A model holding a loaded checkpoint's weights. The model is built on the meta device and takes the
        loaded tensors themselves, so the weights are never held twice; the checkpoint keeps only their names,
        shapes and dtypes afterwards (for `save_pretrained`)."""
        # Made on the meta device through the modules' own `device` and without random init there (model._embedding):
        # torch.device("meta") as a context, or normal_ on meta, imports sympy and friends, 75 MB resident.
        model = cls(checkpoint.config, device="meta")
        quantized = {n: t for n, t in checkpoint.tensors.items() if isinstance(t, Quantized)}
        state = {n: t for n, t in checkpoint.tensors.items() if n not in quantized}
        model.load_state_dict(state, strict=not quantized, assign=True)  # load_checkpoint checked every name
        device = resolve_device(device or "cpu")
        for name, q in quantized.items():  # read quantized (lora.read_dtypes): the map computes dequantized
            hold_quantized(model.get_submodule(name.removesuffix(".weight")), q)
        model = model.to(device=device)  # a quantized map's weight moves with it (DeferredLinear._apply)
        if not checkpoint.stored:  # tensors read as stored: the weights in `dtype` (the converted ones keep theirs)
            model = model.to(dtype=dtype or torch.float32)
        checkpoint.release()
        model.source = checkpoint
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        n_heads: int | None = None,
        feature_type: str | None = None,
        layernorm: str | None = None,
    ) -> PerformerLM:
        """Load a checkpoint: a contract .safetensors file, an hf folder, or a reference state dict (.pt, .pth,
        .bin; loaded without running pickled code).

        Args:
            path: the checkpoint file or folder.
            device: "cpu" (default), "cuda", "cuda:1", "auto" or a torch.device.
            dtype: the weights' dtype in memory (default float32, the master weights training needs).
            n_heads, feature_type, layernorm ("post" or "pre"): what a checkpoint without slimtune_config
                metadata cannot tell from its shapes.

        Returns:
            The model, remembering its checkpoint so that `save_pretrained` keeps its names, dtypes and config.

        Raises:
            CheckpointError: the file is missing, not a checkpoint, or does not match the model layout.

        Example:
            model = PerformerLM.from_pretrained("model.safetensors", device="cuda")
        """
        # In another dtype, the file is read tensor by tensor into it (a mapping would hold the file beside it).
        read_as = None if dtype in (None, torch.float32) else dtype
        checkpoint = load_checkpoint(
            path, n_heads=n_heads, feature_type=feature_type, layernorm=layernorm, dtype=read_as
        )
        return cls.from_checkpoint(checkpoint, device=device, dtype=dtype)

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        format: ExportFormat | str = "safetensors",
        dtype: ExportDtype | str = "auto",
        metadata: dict | None = None,
        extra_config: dict | None = None,
        tokenizer: str | os.PathLike | None = None,
    ) -> Path:
        """Write the weights as a checkpoint the original full model loads unchanged, atomically (a crash leaves
        the previous file or the new one).

        Args:
            path: a .safetensors file, or a folder with format="hf".
            format: "safetensors" (one file) or "hf" (a folder with model.safetensors and config.json).
            dtype: "auto" keeps each tensor's dtype in the checkpoint the model was loaded from (the model's
                own dtype for a new model); or "fp32", "fp16", "bf16".
            metadata: provenance to record (JSON-serialisable); the base checkpoint's name and sha256 are
                recorded by default for a loaded model.
            extra_config: slimtune_config keys beyond the model's seven (for example seq_len).
            tokenizer: the model's tokenizer.json, written into an hf folder (AutoTokenizer loads it from there).

        Returns:
            The path written.

        Example:
            model.save_pretrained("tuned.safetensors", metadata={"note": "one step on my.txt"})
        """
        return save_model(
            self, path, format=format, dtype=dtype, metadata=metadata, extra_config=extra_config, tokenizer=tokenizer
        )

    def export_bytes(self, dtype: str | None = "auto") -> int:
        """What save_pretrained(dtype=...) allocates besides the model at its peak (export.export_bytes)."""
        return export_bytes(self, dtype)
