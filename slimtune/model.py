"""The Performer language model (docs/format.md), in the layout of the SLiM paper's reference code.

The one definition of the math is the chunk-level forward: `forward_chunk(ids, start, states)` runs a chunk
of tokens at absolute positions start, start + 1, ... from per-layer attention states and returns the logits
and the states after the chunk. The full-sequence forward is one chunk from zero states; SLiM runs many.
Each layer is split into `features` (queries, keys, values and their feature maps) and `mix` (attention from
a state, then the feed-forward block), so that SLiM can recover a layer's start state between the two.
Every linear map is a `DeferredLinear`: an nn.Linear (same parameters and state_dict) whose weight gradient
SLiM may batch over small chunks (deferred.py). `from_pretrained` / `save_pretrained` read and write checkpoints.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import lora
from .attention import causal_linear_attention, state_contribution
from .checkpoint import (
    Checkpoint,
    LazyTensors,
    expected_shapes,
    file_sha256,
    load_checkpoint,
    read_tensor,
    save_checkpoint,
)
from .choices import ExportDtype, ExportFormat
from .config import PerformerConfig
from .deferred import DeferredLinear
from .devices import resolve_device
from .features import apply_features, draw_orthogonal_features, favor_multiplier

__all__ = ["PerformerConfig", "PerformerLM"]

LN_EPS = 1e-5


class PerformerAttention(nn.Module):
    """Multi-head causal linear attention; no output projection (as in the reference)."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.q_map, self.k_map, self.v_map = DeferredLinear(d, d), DeferredLinear(d, d), DeferredLinear(d, d)
        # FAVOR+ draw W: [M, d_h]; not part of the state_dict, so checkpoints keep the reference's names.
        self.register_buffer("projection", None, persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # [B, T, d] -> [B, H, T, d_h]
        return x.view(B, T, self.config.n_heads, self.config.head_dim).transpose(1, 2)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, d] -> phi(q), phi(k): [B, H, T, M], and v: [B, H, T, d_h]."""
        phi = lambda y: apply_features(self._heads(y), self.config.feature_type, self.projection)  # noqa: E731
        return phi(self.q_map(x)), phi(self.k_map(x)), self._heads(self.v_map(x))


class PerformerLayer(nn.Module):
    def __init__(self, config: PerformerConfig):
        super().__init__()
        d = config.hidden_dim
        self.post_norm = config.on_gptln
        self.attention = PerformerAttention(config)
        self.U_map = DeferredLinear(d, config.ffn_dim)
        self.V_map = DeferredLinear(config.ffn_dim, d)
        self.layernorm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.layernorm2 = nn.LayerNorm(d, eps=LN_EPS)

    def features(self, x: torch.Tensor):
        """The attention's (phi(q), phi(k), v) for this layer's input x: [B, T, d]."""
        return self.attention.features(x if self.post_norm else self.layernorm1(x))

    def mix(self, x, fq, fk, v, state) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention from `state` ([B, H, M, d_h + 1]) and the feed-forward block: (x [B, T, d], new state)."""
        out, state = causal_linear_attention(fq, fk, v, state)
        B, H, T, Dh = out.shape
        out = out.transpose(1, 2).reshape(B, T, H * Dh)
        if self.post_norm:
            x = x + self.layernorm1(out)
            return x + self.layernorm2(self.V_map(F.gelu(self.U_map(x)))), state
        x = x + out
        return x + self.V_map(F.gelu(self.U_map(self.layernorm2(x)))), state

    def forward(self, x, state):
        return self.mix(x, *self.features(x), state)

    def advance(self, x, state) -> torch.Tensor:
        """Only the state after this chunk (needs k and v, not q, attention or the feed-forward block)."""
        _, fk, v = self.features(x)
        return state + state_contribution(fk, v).to(state.dtype)


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


class PerformerLM(nn.Module):
    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.input_map = nn.Embedding(config.vocab_size, d // 2)
        self.layers = nn.ModuleList(PerformerLayer(config) for _ in range(config.n_layers))
        self.output_logit_map = DeferredLinear(d, config.vocab_size)
        self.source: Checkpoint | None = None  # the checkpoint the weights came from (names, dtypes, config)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> PerformerLM:
        """A model holding a loaded checkpoint's weights. The model is built on the meta device and takes the
        loaded tensors themselves, so the weights are never held twice; the checkpoint keeps only their names,
        shapes and dtypes afterwards (for `save_pretrained`)."""
        with torch.device("meta"):
            model = cls(checkpoint.config)
        model.load_state_dict(checkpoint.tensors, strict=True, assign=True)
        model = model.to(device=resolve_device(device or "cpu"))
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

        Returns:
            The path written.

        Example:
            model.save_pretrained("tuned.safetensors", metadata={"note": "one step on my.txt"})
        """
        cast = ExportDtype.parse(dtype, "dtype").dtype
        state = self.state_dict()
        maps = {f"{name}.weight": m for name, m in lora.adapters(self).items()}  # merged into the input's tensors
        out = {n: cast or self._stored_dtype(n, state) for n in expected_shapes(self.config)}
        # Made, written and freed one at a time: the export holds one tensor, never a second copy of the model.
        tensors = LazyTensors(
            {n: (shape, out[n]) for n, shape in expected_shapes(self.config).items()},
            lambda n: self._export_tensor(n, state, maps, out[n]),
        )
        if self.source is not None:
            config = self.source.extra_config | (extra_config or {})
            provenance = {"base_checkpoint": self.source.path.name}
            if self.source.path.is_file():
                provenance["base_sha256"] = file_sha256(self.source.path)
        else:
            config, provenance = dict(extra_config or {}), {}
        return save_checkpoint(
            path,
            tensors,
            self.config,
            extra_config=config,
            provenance=provenance | (metadata or {}),
            fmt=ExportFormat.parse(format, "format"),
        )

    def _stored_dtype(self, name: str, state: dict[str, torch.Tensor]) -> torch.dtype:
        """The tensor's dtype in the checkpoint the model was loaded from (its own for a new model)."""
        return (self.source.tensors[name] if self.source is not None else state[name]).dtype

    def _export_tensor(self, name: str, state, maps: dict[str, lora.LoraLinear], out: torch.dtype) -> torch.Tensor:
        """One tensor of the export, on the host in `out`: the model's, or for an adapted model the input's own
        (CONTRACT.md section 4), with a target's adapter merged into it."""
        tensor = self._base_tensor(name, state) if maps else state[name].detach()
        if name in maps:
            tensor = lora.merged_weight(maps[name], tensor)
        return tensor.to("cpu", out).contiguous()

    def _base_tensor(self, name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """A base tensor as the input checkpoint holds it: from memory where memory holds it without loss (an fp32
        copy of fp32, bf16 or fp16), else read again from the checkpoint's file (a bf16 base of an fp32 input)."""
        held = state[name].detach()
        if self.source is None:
            return held
        kept = self.source.tensors[name].dtype
        if held.dtype == kept or (held.dtype == torch.float32 and kept in (torch.bfloat16, torch.float16)):
            return held.to("cpu", kept)
        return read_tensor(self.source, name)

    def export_bytes(self, dtype: str | None = "auto") -> int:
        """What save_pretrained(dtype=...) allocates besides the model at its peak, in bytes (the planner's export
        line). The export makes one tensor at a time and frees it once written, so this is the costliest single
        tensor (_export_cost). On a GPU the copies are the host's, and the device holds one merge's delta."""
        cast = ExportDtype.parse(dtype, "dtype").dtype
        state = self.state_dict()
        targets = {f"{name}.weight" for name in lora.adapters(self)}
        if next(self.parameters()).device.type != "cpu":
            return max((state[n].numel() * 4 for n in targets), default=0)
        peak = 0
        for n in expected_shapes(self.config):
            stored = self._stored_dtype(n, state)
            cost = _export_cost(
                state[n].numel(), state[n].dtype, stored, cast or stored, adapted=bool(targets), target=n in targets
            )
            peak = max(peak, cost)
        return peak

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.output_logit_map.weight.dtype

    def initial_states(self, batch_size: int, *, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Zero attention states, one [B, H, M, d_h + 1] per layer (last column: the normaliser z)."""
        c = self.config
        ref = self.output_logit_map.weight
        shape = (batch_size, c.n_heads, c.n_features, c.head_dim + 1)
        return [torch.zeros(shape, dtype=dtype or ref.dtype, device=ref.device) for _ in self.layers]

    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw new FAVOR+ features for every layer (a no-op for elementwise maps). Call once per training step:
        every chunk of a step must see the same draw."""
        c = self.config
        if favor_multiplier(c.feature_type) is None:
            return
        ref = self.output_logit_map.weight
        for layer in self.layers:
            w = draw_orthogonal_features(c.n_features, c.head_dim, generator=generator)
            layer.attention.projection = w.to(device=ref.device, dtype=ref.dtype)

    def embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids: [B, T] at positions start.. -> x: [B, T, d] = [E[id], sin(p w), cos(p w)]."""
        # Angles in float64 whatever the model's dtype: p * w loses digits in fp32 at long positions.
        half = self.config.hidden_dim // 2
        w = torch.exp(torch.arange(0, half, 2, device=ids.device, dtype=torch.float64) * (-math.log(10000.0) / half))
        positions = torch.arange(start, start + ids.shape[1], device=ids.device, dtype=torch.float64)
        angles = (positions[:, None] * w).to(self.output_logit_map.weight.dtype)
        tok = self.input_map(ids)
        pos = torch.cat([angles.sin(), angles.cos()], dim=-1).expand(ids.shape[0], -1, -1)
        return torch.cat([tok, pos], dim=-1)

    def forward_chunk(self, ids: torch.Tensor, start: int, states: list[torch.Tensor]):
        """ids: [B, T] at positions start..start+T-1; states: per layer [B, H, M, d_h + 1].
        Returns (logits [B, T, V], states after the chunk)."""
        x = self.embed(ids, start)
        new_states = []
        for layer, state in zip(self.layers, states, strict=True):
            x, state = layer(x, state)
            new_states.append(state)
        return self.output_logit_map(x), new_states

    def advance(self, ids: torch.Tensor, start: int, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The states after the chunk, doing only the work they depend on: no logits, and in the last layer
        only its keys and values."""
        x = self.embed(ids, start)
        *body, last = self.layers
        new_states = []
        for layer, state in zip(body, states[:-1], strict=True):
            x, state = layer(x, state)
            new_states.append(state)
        return new_states + [last.advance(x, states[-1])]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [B, T, V] for ids [B, T] starting at position 0."""
        return self.forward_chunk(ids, 0, self.initial_states(ids.shape[0]))[0]
