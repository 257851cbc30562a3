"""The Performer language model (docs/format.md), in the layout of the SLiM paper's reference code.

The one definition of the math is the chunk-level forward: `forward_chunk(ids, start, states)` runs a chunk
of tokens at absolute positions start, start + 1, ... from per-layer attention states and returns the logits
and the states after the chunk. The full-sequence forward is one chunk from zero states; SLiM runs many.
Each layer is split into `features` (queries, keys, values and their feature maps) and `mix` (attention from
a state, then the feed-forward block), so that SLiM can recover a layer's start state between the two.
Every linear map is a `DeferredLinear`: an nn.Linear (same parameters and state_dict) whose weight gradient
SLiM may batch over small chunks (deferred.py). Reading and writing checkpoints is pretrained.py's (PerformerLM).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import causal_linear_attention, state_contribution
from .config import PerformerConfig
from .deferred import DeferredLinear
from .features import apply_features, draw_orthogonal_features, favor_multiplier

__all__ = ["PerformerConfig", "Performer"]

LN_EPS = 1e-5


class PerformerAttention(nn.Module):
    """Multi-head causal linear attention; no output projection (as in the reference)."""

    def __init__(self, config: PerformerConfig, device=None):
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.q_map, self.k_map, self.v_map = (DeferredLinear(d, d, device=device) for _ in range(3))
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
    def __init__(self, config: PerformerConfig, device=None):
        super().__init__()
        d = config.hidden_dim
        self.post_norm = config.on_gptln
        self.attention = PerformerAttention(config, device)
        self.U_map = DeferredLinear(d, config.ffn_dim, device=device)
        self.V_map = DeferredLinear(config.ffn_dim, d, device=device)
        self.layernorm1 = nn.LayerNorm(d, eps=LN_EPS, device=device)
        self.layernorm2 = nn.LayerNorm(d, eps=LN_EPS, device=device)

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


# Bytes of fp32 logits a chunk makes at once: beyond it the output map and the loss run over tiles of positions
# (Performer.loss_tile), so a large vocabulary costs O(tile x V), not O(C x V), whatever C.
LOGITS_TILE_BYTES = 16 * 2**20


def _embedding(count: int, dim: int, device) -> nn.Embedding:
    """nn.Embedding, initialised as it does, but on the meta device without its init: normal_ on meta runs PyTorch's
    Python meta kernels, whose first use imports sympy and friends (75 MB resident on every checkpoint load)."""
    if str(device) == "meta":
        return nn.Embedding(count, dim, _weight=torch.empty(count, dim, device="meta"))
    return nn.Embedding(count, dim, device=device)


class Performer(nn.Module):
    """The network: embeddings, layers and the output map, and the chunk-level forward SLiM runs."""

    def __init__(self, config: PerformerConfig, device=None):
        """`device`: where the parameters are made ("meta": none allocated, for weights assigned afterwards)."""
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.input_map = _embedding(config.vocab_size, d // 2, device)
        self.layers = nn.ModuleList(PerformerLayer(config, device) for _ in range(config.n_layers))
        self.output_logit_map = DeferredLinear(d, config.vocab_size, device=device)
        # Where the weights came from, set by whoever loaded them (pretrained.py: the checkpoint's names, dtypes and
        # config, which the export keeps); None for a new model.
        self.source = None

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
        x, new_states = self.hidden_chunk(ids, start, states)
        return self.output_logit_map(x), new_states

    def hidden_chunk(self, ids: torch.Tensor, start: int, states: list[torch.Tensor]):
        """forward_chunk without the output map: (the last layer's output [B, T, d], states after the chunk)."""
        x = self.embed(ids, start)
        new_states = []
        for layer, state in zip(self.layers, states, strict=True):
            x, state = layer(x, state)
            new_states.append(state)
        return x, new_states

    def hidden_pass(self, ids: torch.Tensor, chunk_size: int):
        """The layers over ids [B, T] from position 0, `chunk_size` tokens at a time, with float64 states carried:
        (the last chunk's output [B, C, d], the states after it)."""
        states = self.initial_states(ids.shape[0], dtype=torch.float64)
        for s in range(0, ids.shape[1], chunk_size):
            hidden, states = self.hidden_chunk(ids[:, s : s + chunk_size], s, states)
        return hidden, states

    def loss_tile(self, batch_size: int) -> int:
        """Positions of a chunk whose logits [B, tile, V] are made at a time (slim.py, evaluation.py): all of them
        while those stay under LOGITS_TILE_BYTES (a byte-level vocabulary up to C = 16384 at batch 1), else a tile
        of at most 256 positions, so that the planner's two probes (256 and 1024 tokens) both run tiled and its
        line through them holds."""
        per_position = batch_size * self.config.vocab_size * 4  # fp32 logits
        tile = max(1, LOGITS_TILE_BYTES // per_position)
        return tile if tile >= 1024 else min(tile, 256)

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
